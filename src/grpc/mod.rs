//! The gRPC door: tonic services, and the conversion between protobuf and domain types.

pub mod admin;
pub mod auth;
pub mod lifecycle;
pub mod reload;
pub mod request_log;
pub mod server;
pub mod service;
pub mod tls;
