//! The Watch stream: a reader task applies the client's changes; events come from the
//! broker's commit path through a bounded channel (see [`crate::core::watch`] for overflow).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use taskd_proto::pb;
use tokio::sync::mpsc;
use tonic::{Response, Status, Streaming};

use super::Api;
use super::validate;
use crate::core::watch::WatchChange;
use crate::core::{CloseReason, SendOutcome, WatchSink};

/// Response messages buffered per watcher before it is dropped as too slow.
pub const WATCH_BUFFER: usize = 4096;

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

type Slot = Arc<Mutex<Option<Status>>>;

struct ChannelSink {
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    slot: Slot,
}

fn close_status(reason: CloseReason) -> Status {
    match reason {
        CloseReason::Shutdown => Status::unavailable("taskd is shutting down"),
        CloseReason::Replaced => Status::aborted("replaced by a newer stream"),
        CloseReason::Overflow => Status::resource_exhausted(format!(
            "this watcher fell {WATCH_BUFFER} messages behind and was dropped; reconnect and re-add its ids"
        )),
    }
}

fn set_slot(slot: &Slot, status: Status) {
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(status);
    }
}

impl WatchSink for ChannelSink {
    fn try_send(&self, msg: pb::WatchResponse) -> SendOutcome {
        match self.tx.try_send(Ok(msg)) {
            Ok(()) => SendOutcome::Sent,
            Err(mpsc::error::TrySendError::Full(_)) => SendOutcome::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => SendOutcome::Closed,
        }
    }

    fn close(&self, reason: CloseReason) {
        set_slot(&self.slot, close_status(reason));
    }
}

/// Opens a watch stream over `inbound`.
pub fn open(
    api: &Api,
    mut inbound: Streaming<pb::WatchRequest>,
) -> Result<Response<WatchStream>, Status> {
    let broker = api.broker()?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let slot: Slot = Arc::new(Mutex::new(None));
    // The broker holds the only sender: when it drops the watcher, the stream ends (with the
    // status left in the slot, if any).
    let wid = broker.watch_open(Arc::new(ChannelSink {
        tx,
        slot: slot.clone(),
    }))?;
    let shutdown = api.shutdown.clone();
    let reader_slot = slot.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = shutdown.cancelled() => break,
            };
            let req = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            match parse(req) {
                Ok(change) => broker.watch_change(wid, change).await,
                Err(status) => {
                    set_slot(&reader_slot, status);
                    break;
                }
            }
        }
        broker.watch_close(wid);
    });
    let stream = futures::stream::unfold((rx, slot, false), |(mut rx, slot, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(item) => Some((item, (rx, slot, false))),
            None => {
                let status = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                status.map(|s| (Err(s), (rx, slot, true)))
            }
        }
    });
    Ok(Response::new(Box::pin(stream)))
}

fn parse(req: pb::WatchRequest) -> Result<WatchChange, Status> {
    let mut change = WatchChange::default();
    for s in req.add_ids {
        match s.parse() {
            Ok(id) => change.add_ids.push(id),
            Err(_) => change.bad_ids.push(s),
        }
    }
    change.remove_ids = req
        .remove_ids
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    for (i, q) in req.add_queues.iter().enumerate() {
        validate::check_name(&format!("add_queues[{i}]"), q)?;
    }
    change.add_queues = req.add_queues;
    change.remove_queues = req.remove_queues;
    Ok(change)
}
