//! The gRPC door: the tonic services (scoring, model admin), authentication, TLS, request
//! logs and the server that hosts them. Conversions live in `wire/`, start-up in `serve/`.

pub mod admin;
pub mod auth;
pub mod gateway;
pub mod request_log;
pub mod rules;
pub mod server;
pub mod service;
pub mod tls;
