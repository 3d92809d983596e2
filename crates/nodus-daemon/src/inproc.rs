//! An in-process service's side of request/reply: a built-in service (`flags`, `control`) that
//! asks other nodes' services something sends the request through the router like any client,
//! under an id of its own, and gets the answer back on its queue; [`InProc`] matches the two.
//!
//! Bounds: at most [`MAX_OUTSTANDING`] requests await an answer at once (more fail at once with
//! [`AskError::Busy`]); every request has a timeout, after which its entry is gone.

use crate::router::ConnId;
use crate::server::Shared;
use nodus_wire::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Most requests one in-process service may have awaiting an answer.
pub const MAX_OUTSTANDING: usize = 4096;

/// Why a request of an in-process service got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Too many requests await an answer already.
    #[error("{MAX_OUTSTANDING} requests await an answer already")]
    Busy,
}

/// The connection of one in-process service, with the requests it awaits answers to.
pub(crate) struct InProc {
    shared: Arc<Shared>,
    conn: ConnId,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
}

impl InProc {
    /// The service attached as `conn`.
    pub(crate) fn new(shared: Arc<Shared>, conn: ConnId) -> Arc<InProc> {
        Arc::new(InProc { shared, conn, next: AtomicU64::new(1), waiting: Mutex::new(HashMap::new()) })
    }

    /// The router connection of the service.
    pub(crate) fn conn(&self) -> ConnId {
        self.conn
    }

    /// A fresh id for a request this service sends itself (answers to it come back through
    /// [`InProc::settle`], which gives them back: nobody waits for them here).
    pub(crate) fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The node.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Sends a message (an answer, a notice) without waiting for anything.
    pub(crate) fn send(&self, msg: Message) {
        self.shared.inject(self.conn, msg);
    }

    /// Sends `msg` as a request and waits at most `timeout` for the message answering it.
    ///
    /// Fails on timeout, or when too many requests are outstanding.
    pub(crate) async fn ask(&self, mut msg: Message, timeout: Duration) -> Result<Message, AskError> {
        let id = self.next_id();
        msg.envelope.id = id;
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.lock();
            if waiting.len() >= MAX_OUTSTANDING {
                return Err(AskError::Busy);
            }
            waiting.insert(id, tx);
        }
        self.send(msg);
        let answer = tokio::time::timeout(timeout, rx).await;
        self.lock().remove(&id);
        match answer {
            Ok(Ok(m)) => Ok(m),
            _ => Err(AskError::Timeout(timeout)),
        }
    }

    /// Hands an answer to the request waiting for it; gives it back when nobody waits (then it
    /// is an answer to something else, or came too late).
    pub(crate) fn settle(&self, msg: Message) -> Option<Message> {
        let id = msg.envelope.reply_to;
        if id == 0 {
            return Some(msg);
        }
        match self.lock().remove(&id) {
            Some(tx) => {
                let _ = tx.send(msg);
                None
            }
            None => Some(msg),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Message>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}
