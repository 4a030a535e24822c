//! The meeting point of protobuf and the domain, for the whole crate: [`parse`] turns wire
//! messages into validated domain types (the only place input is checked), [`answer`] turns
//! the engine's answers back into wire messages. Every door (gRPC, NATS, the cluster), the
//! journal's recovery, the CSV reader and the exports use these; none of them reaches into
//! another door for a conversion.

pub mod answer;
pub mod parse;

/// Largest request accepted, in bytes; a transaction is a few hundred.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
