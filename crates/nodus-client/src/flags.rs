//! Flags from Rust, like communicatord's `COMMUNICATORD_FLAG_UP(...)->set_priority(..).save()`:
//! raise a flag when something needs an operator's attention, lower it when the condition clears.
//!
//! ```no_run
//! # async fn demo(client: nodus_client::Client) -> Result<(), nodus_client::flags::FlagsError> {
//! client
//!     .flag("backup", "nightly", "failed")
//!     .message("the nightly backup failed: disk full")
//!     .priority(60)
//!     .tag("disk")
//!     .source(file!(), module_path!(), line!())
//!     .up()
//!     .await?;
//! // ... later, once a backup succeeded:
//! client.flag("backup", "nightly", "failed").down().await?;
//! # Ok(()) }
//! ```
//!
//! The calls go to the node's built-in `flags` service (`FLAG_UP`, `FLAG_DOWN`, `FLAG_CLEAR`,
//! `FLAG_LIST`, `FLAG_STATUS`; see [`nodus_control::flags::wire`]); a shell script sends the
//! same messages in the text form.

use crate::{Client, ClientError};
use nodus_control::flags::{Flag, FlagError, FlagKey, FlagReply, FlagRequest, Raise};

pub use nodus_control::flags::{FlagKey as Key, DEFAULT_PRIORITY, MAX_PRIORITY};

/// The node's flag service.
pub const SERVICE: &str = "flags";

/// Why a flag call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlagsError {
    /// The request could not be made, or the node refused it (see [`ClientError::Refused`]).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The flag is invalid, or the flags service refused the change (`manual_down`,
    /// `too_many_flags`, `storage`, ...).
    #[error(transparent)]
    Flag(#[from] FlagError),
}

/// How many flags are raised on a node, and whether the one asked about is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagStatus {
    /// Raised flags (the "too many flags" flag included).
    pub count: usize,
    /// Whether the flag asked about (or, without one, any flag) is raised.
    pub raised: bool,
}

/// A flag about to be raised or lowered: [`Client::flag`], then the builder methods, then
/// [`FlagBuilder::up`] or [`FlagBuilder::down`].
#[must_use = "a flag is raised or lowered only by up() or down()"]
pub struct FlagBuilder<'a> {
    client: &'a Client,
    key: Result<FlagKey, FlagError>,
    raise: Raise,
}

impl Client {
    /// The flag `unit`/`section`/`name` (checked when sent: `[a-z][a-z0-9-]*`, upper case folded).
    pub fn flag(&self, unit: &str, section: &str, name: &str) -> FlagBuilder<'_> {
        let key = FlagKey::new(unit, section, name);
        // A placeholder key until the real one is known valid; never sent when `key` is an error.
        let placeholder = key.clone().unwrap_or_else(|_| FlagKey::too_many());
        FlagBuilder { client: self, key, raise: Raise::new(placeholder, "") }
    }

    /// The raised flags of this node, or with `cluster` of every live node (each flag's
    /// `hostname` names the node that raised it).
    ///
    /// Fails when the request fails or the answer is not a flag list.
    pub async fn flags_list(&self, cluster: bool) -> Result<Vec<Flag>, FlagsError> {
        let mut m = FlagRequest::List.to_message().to(SERVICE);
        if cluster {
            m = m.param("scope", "cluster");
        }
        match FlagReply::from_message(&self.request(m).await?)? {
            FlagReply::List(flags) => Ok(flags),
            other => Err(unexpected(&other)),
        }
    }

    /// How many flags are raised, and whether `key` (or, with `None`, any flag) is.
    ///
    /// Fails when the request fails or the answer is not a status.
    pub async fn flags_status(&self, key: Option<FlagKey>) -> Result<FlagStatus, FlagsError> {
        let m = FlagRequest::Status(key).to_message().to(SERVICE);
        match FlagReply::from_message(&self.request(m).await?)? {
            FlagReply::Status { count, raised, .. } => Ok(FlagStatus { count, raised }),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends one flag request and returns the service's answer, decoded.
    ///
    /// Fails when the request fails, or the service refuses it.
    pub async fn flag_request(&self, request: &FlagRequest) -> Result<FlagReply, FlagsError> {
        let reply = self.request(request.to_message().to(SERVICE)).await?;
        Ok(FlagReply::from_message(&reply)?)
    }
}

impl FlagBuilder<'_> {
    /// What is wrong and what to do (required to raise).
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.raise.message = message.into();
        self
    }

    /// 0–100 (default 5); high priorities alert people.
    pub fn priority(mut self, priority: u8) -> Self {
        self.raise.priority = priority;
        self
    }

    /// Only an operator may take the flag down (`nodus flags down --manual`).
    pub fn manual_down(mut self, manual: bool) -> Self {
        self.raise.manual_down = manual;
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.raise.tags.insert(tag.into());
        self
    }

    /// Where in the code the flag is raised: `.source(file!(), module_path!(), line!())`.
    pub fn source(mut self, file: impl Into<String>, function: impl Into<String>, line: u32) -> Self {
        self.raise = self.raise.source(file, function, line);
        self
    }

    /// Raises the flag (again: its count goes up); returns its raise count.
    ///
    /// Fails when the flag is invalid (bad name, priority, tag, message too long), the node
    /// refuses (`too_many_flags`, `storage`) or the request fails.
    pub async fn up(self) -> Result<u64, FlagsError> {
        let mut raise = self.raise;
        raise.key = self.key?;
        let request = FlagRequest::Up(raise.checked()?);
        match self.client.flag_request(&request).await? {
            FlagReply::IsUp { count, .. } => Ok(count),
            other => Err(unexpected(&other)),
        }
    }

    /// Lowers the flag because the condition cleared; returns whether it was raised. A
    /// manual-down flag is refused (`manual_down`): an operator lowers it with
    /// [`FlagBuilder::clear`].
    ///
    /// Fails when the name is invalid, the node refuses or the request fails.
    pub async fn down(self) -> Result<bool, FlagsError> {
        self.lower(false).await
    }

    /// Lowers the flag as an operator (any flag, manual-down ones too; needs `admin`); returns
    /// whether it was raised.
    ///
    /// Fails when the name is invalid, the connection may not (`forbidden`) or the request fails.
    pub async fn clear(self) -> Result<bool, FlagsError> {
        self.lower(true).await
    }

    async fn lower(self, manual: bool) -> Result<bool, FlagsError> {
        let key = self.key?;
        let request = if manual { FlagRequest::Clear(key) } else { FlagRequest::Down(key) };
        match self.client.flag_request(&request).await? {
            FlagReply::IsDown { lowered, .. } => Ok(lowered),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(reply: &FlagReply) -> FlagsError {
    FlagsError::Flag(FlagError::Refused {
        code: "unexpected".into(),
        message: format!("the flags service answered {reply:?}"),
    })
}
