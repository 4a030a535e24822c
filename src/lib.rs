//! fraudgate: real-time fraud scoring for payment authorisation.
//!
//! Data flows one way: a door (gRPC, NATS JetStream, CSV replay) parses input into a validated
//! [`domain::Transaction`], the transport-free [`engine::Engine`] reads and updates the
//! event-time [`state`], [`features`] turns that into one fixed-order vector, the [`model`]
//! scores it, and [`policy`] turns the score into a decision with reasons.

pub mod admin;
pub mod alerts;
pub mod backtest;
pub mod breaker;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod console;
pub mod dataset;
pub mod domain;
pub mod drift;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod features;
pub mod grpc;
pub mod handbook;
pub mod ids;
pub mod journal;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod nats;
pub mod node;
pub mod policy;
pub mod registry;
pub mod retrain;
pub mod rules;
pub mod rules_admin;
pub mod serve;
pub mod sim;
pub mod snapshot;
pub mod state;
pub mod stream;
pub mod train;
pub mod wire;

/// Code generated from `proto/fraudgate/v1/fraudgate.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("fraudgate.v1");

    /// Encoded descriptor set of the fraudgate protos, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/fraudgate_descriptor.bin"));
}
