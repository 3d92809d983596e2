//! The caller's side of one invocation: send chunks up, receive chunks until choke or error.

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::balance::Rejection;
use crate::engine::AppEvent;

/// What the engine tells a session's caller.
#[derive(Debug)]
pub(crate) enum Down {
    Chunk(Bytes),
    Choke,
    Error(SessionError),
}

/// What a caller sends up a session.
#[derive(Debug, Clone)]
pub(crate) enum Up {
    Chunk(Bytes),
    Choke,
    Error { category: i64, code: i64, message: String },
}

/// Why a session ended without a choke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The worker answered with an error.
    #[error("worker error [{category}, {code}]: {message}")]
    Worker {
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// The worker's text.
        message: String,
    },
    /// The worker process failed (crashed, hung, disconnected) while the session was open.
    #[error("worker failed: {0}; the request may be retried")]
    WorkerFailed(String),
    /// The request waited in the queue and was then refused (the app failed or stopped).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// More chunks were buffered than the engine allows (the caller sent too much before a
    /// worker took the request, or read replies too slowly).
    #[error("session buffer overflow ({0} messages); read replies faster or send less before the first reply")]
    Overflow(usize),
    /// The engine or the app went away.
    #[error("engine shut down or the app was removed")]
    EngineGone,
    /// The caller's side was already closed.
    #[error("session already closed")]
    Closed,
}

/// One open invocation. Dropping it abandons the request (a queued one is withdrawn; an open
/// one gets an error sent to its worker).
#[derive(Debug)]
pub struct Session {
    pub(crate) id: u64,
    pub(crate) app: mpsc::Sender<AppEvent>,
    pub(crate) down: mpsc::Receiver<Down>,
    pub(crate) up_closed: bool,
    pub(crate) done: bool,
}

impl Session {
    /// Sends one chunk to the worker.
    ///
    /// # Errors
    /// [`SessionError::Closed`] after [`Session::close`]; [`SessionError::EngineGone`] when the
    /// app no longer exists.
    pub async fn send(&mut self, data: impl Into<Bytes>) -> Result<(), SessionError> {
        self.up(Up::Chunk(data.into())).await
    }

    /// Closes the caller's side (choke): the worker sees the end of its input.
    ///
    /// # Errors
    /// As [`Session::send`].
    pub async fn close(&mut self) -> Result<(), SessionError> {
        self.up(Up::Choke).await?;
        self.up_closed = true;
        Ok(())
    }

    /// Ends the caller's side with an error sent to the worker.
    ///
    /// # Errors
    /// As [`Session::send`].
    pub async fn fail(&mut self, category: i64, code: i64, message: impl Into<String>) -> Result<(), SessionError> {
        self.up(Up::Error { category, code, message: message.into() }).await?;
        self.up_closed = true;
        Ok(())
    }

    /// The next chunk from the worker; `Ok(None)` once the worker closed its side (choke).
    ///
    /// # Errors
    /// The worker's error, the worker's failure, a rejection from the queue, an overflow or the
    /// engine going away. Nothing follows an error.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, SessionError> {
        if self.done {
            return Ok(None);
        }
        match self.down.recv().await {
            Some(Down::Chunk(b)) => Ok(Some(b)),
            Some(Down::Choke) => {
                self.done = true;
                Ok(None)
            }
            Some(Down::Error(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(SessionError::EngineGone)
            }
        }
    }

    /// Closes the caller's side if still open and collects every chunk until the choke.
    ///
    /// # Errors
    /// As [`Session::recv`].
    pub async fn collect(mut self) -> Result<Vec<Bytes>, SessionError> {
        if !self.up_closed {
            self.close().await?;
        }
        let mut out = Vec::new();
        while let Some(b) = self.recv().await? {
            out.push(b);
        }
        Ok(out)
    }

    async fn up(&mut self, msg: Up) -> Result<(), SessionError> {
        if self.up_closed {
            return Err(SessionError::Closed);
        }
        self.app.send(AppEvent::Up { session: self.id, msg }).await.map_err(|_| SessionError::EngineGone)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.done && self.up_closed {
            return;
        }
        let ev = AppEvent::Dropped { session: self.id };
        if let Err(mpsc::error::TrySendError::Full(ev)) = self.app.try_send(ev) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let app = self.app.clone();
                rt.spawn(async move {
                    let _ = app.send(ev).await;
                });
            }
        }
    }
}
