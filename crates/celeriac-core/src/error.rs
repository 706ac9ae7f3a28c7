//! Typed errors shared by transports, backends and the protocol layer.
//!
//! Each variant is one thing a caller can act on: a broker that cannot be reached is retried or
//! reported with exit code 3, a malformed message is dead-lettered, and so on. Messages name the
//! thing that failed and the value that was wrong.

use std::time::Duration;

/// An error from a broker transport.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached (connection refused, timed out, handshake failed).
    #[error("broker {url} is unreachable: {reason}")]
    Unreachable {
        /// The broker URL with any password removed.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The broker URL could not be understood.
    #[error("bad broker URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given (password removed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker refused an operation (for example an unroutable publish).
    #[error("broker {url} rejected the operation: {reason}")]
    Rejected {
        /// The broker URL with any password removed.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An operation did not complete in time.
    #[error("broker {url}: {operation} timed out after {elapsed:?}")]
    Timeout {
        /// The broker URL with any password removed.
        url: String,
        /// The operation that timed out.
        operation: String,
        /// How long was waited.
        elapsed: Duration,
    },
    /// The broker is shutting down or the consumer was closed.
    #[error("broker connection closed")]
    Closed,
    /// A storage or I/O error inside the transport.
    #[error("broker {url}: {reason}")]
    Io {
        /// The broker URL with any password removed.
        url: String,
        /// The underlying error.
        reason: String,
    },
}

/// An error from a result backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend could not be reached.
    #[error("result backend {url} is unreachable: {reason}")]
    Unreachable {
        /// The backend URL with any password removed.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The backend URL could not be understood.
    #[error("bad result backend URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored result could not be decoded.
    #[error("result for task {task_id} is not valid: {reason}")]
    Corrupt {
        /// The task whose result is broken.
        task_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Waiting for a result timed out.
    #[error("no result for task {task_id} after {waited:?}")]
    Timeout {
        /// The task waited on.
        task_id: String,
        /// How long was waited.
        waited: Duration,
    },
    /// The backend cannot do this by its nature (the RPC backend cannot read a result sent to
    /// another process, nor forget one).
    #[error("result backend {url} cannot {operation}: {reason}")]
    Unsupported {
        /// The backend URL.
        url: String,
        /// What was asked.
        operation: String,
        /// Why it cannot be done, and what to use instead.
        reason: String,
    },
    /// This backend does not store results (`disabled`).
    #[error("results are disabled (no result backend configured)")]
    Disabled,
    /// A storage or I/O error inside the backend.
    #[error("result backend {url}: {reason}")]
    Io {
        /// The backend URL with any password removed.
        url: String,
        /// The underlying error.
        reason: String,
    },
}

/// A message that does not follow Celery's message protocol v2.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The content type is not one celeriac can decode.
    #[error("unsupported content type {0:?} (supported: application/json)")]
    UnsupportedContentType(String),
    /// The content encoding is not one celeriac can decode.
    #[error("unsupported content encoding {0:?} (supported: utf-8, binary)")]
    UnsupportedContentEncoding(String),
    /// A required header is absent.
    #[error("message has no {0:?} header")]
    MissingHeader(&'static str),
    /// Neither protocol v2 (no `task` header) nor protocol v1 (a body object with `task`).
    #[error("message has no \"task\" header, and is not a protocol v1 task message: {0}")]
    NotATask(String),
    /// A header has the wrong type or an unparsable value.
    #[error("header {name:?} is invalid: {reason}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is not `[args, kwargs, embed]` in the declared content type.
    #[error("malformed body: {0}")]
    MalformedBody(String),
    /// The kombu envelope around the message is broken.
    #[error("malformed envelope: {0}")]
    MalformedEnvelope(String),
    /// The body's `compression` header names an unknown codec, or the compressed body is
    /// corrupt or too large once decompressed.
    #[error(transparent)]
    Compression(#[from] crate::compression::CompressionError),
    /// A value could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}
