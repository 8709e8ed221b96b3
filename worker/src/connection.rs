//! Opening the `Work` stream: connect, send the hello, wait for the hello reply.

use std::sync::Arc;
use std::time::Duration;

use taskd_proto::pb;
use taskd_proto::pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::builder::Config;

/// Heartbeat interval used when the broker names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// Longest heartbeat interval used, whatever the broker names.
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// An open `Work` stream whose hello was answered.
#[derive(Debug)]
pub(crate) struct Session {
    /// Outgoing messages. Unbounded so the worker loop never blocks on a slow network; what
    /// it holds is bounded by the outcomes and heartbeats the worker produces meanwhile, and
    /// a dead connection is found by HTTP/2 keepalive and dropped with it.
    pub(crate) tx: mpsc::UnboundedSender<pb::WorkerMessage>,
    pub(crate) inbound: tonic::Streaming<pb::BrokerMessage>,
    pub(crate) reply: pb::HelloReply,
    /// The rest of the first broker message (it may already carry assignments).
    pub(crate) first: Option<pb::BrokerMessage>,
    pub(crate) heartbeat: Interval,
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the broker refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the broker closed the stream before its hello reply")]
    NoHelloReply,
    #[error("the broker's first message was not a hello reply")]
    UnexpectedFirstMessage,
    #[error("no hello reply within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// The status when retrying cannot help (bad token, invalid hello).
    pub(crate) fn fatal_status(&self) -> Option<&tonic::Status> {
        match self {
            ConnectError::Status(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                ) =>
            {
                Some(status)
            }
            _ => None,
        }
    }
}

/// Connects, sends `hello` and waits for the reply, all within the connect timeout.
pub(crate) async fn open(
    config: Arc<Config>,
    hello: pb::Hello,
) -> Result<Box<Session>, ConnectError> {
    let bound = config.connect_timeout;
    match tokio::time::timeout(bound, open_inner(&config, hello)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout(bound)),
    }
}

async fn open_inner(config: &Config, hello: pb::Hello) -> Result<Box<Session>, ConnectError> {
    let channel = config.endpoint.connect().await?;
    let mut client = WorkerServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::unbounded_channel();
    // The receiver is alive, so this cannot fail.
    let _ = tx.send(pb::WorkerMessage {
        hello: Some(hello),
        ..Default::default()
    });
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
    if let Some(token) = &config.token {
        request
            .metadata_mut()
            .insert(taskd_proto::AUTHORIZATION_HEADER, token.clone());
    }
    let mut inbound = client.work(request).await?.into_inner();
    let mut first = inbound.message().await?.ok_or(ConnectError::NoHelloReply)?;
    let reply = first
        .hello_reply
        .take()
        .ok_or(ConnectError::UnexpectedFirstMessage)?;
    let period = match reply.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        // Beating more often than asked is harmless; a huge interval must not overflow.
        ms => Duration::from_millis(ms).min(MAX_HEARTBEAT),
    };
    let mut heartbeat = tokio::time::interval_at(crate::time::after(period), period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Ok(Box::new(Session {
        tx,
        inbound,
        reply,
        first: Some(first),
        heartbeat,
    }))
}
