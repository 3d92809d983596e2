//! The control messages of seed 000 on [`nodus_wire::Message`].
//!
//! Every control message carries the seed's envelope (`id`, `pid`, `creator`, `created_at`,
//! `expires_at`, `spec`) and a tag `<message_type>:<spec>:<id>:<pid>:<creator>` that makes it
//! readable in the text form:
//!
//! ```text
//! node/MONITORING component=42;message_type=config;spec=monitoring;sync_time=1700000000000;tag=config:monitoring:7:null:cli;_creator=cli;_expires_at=1700000005000;_id=7
//! <a:billing a:cli/RESULT component=42;host=a;is_running=true;message=;message_type=result;name=billing;spec=monitoring;sync_time=1700000000000;tag=result:monitoring:7:42:a:billing;_creator=a:billing;_expires_at=1700000005000;_pid=42;_reply_to=7
//! <a:control a:jobs/ERROR code=killed;command=KILL;component=42;message=service billing (42) was killed by cli;message_type=error;spec=kill;tag=error:kill:9:42:a:control;_creator=a:control;_pid=42
//! ```
//!
//! | message | command | `message_type` | body parameters |
//! |---|---|---|---|
//! | monitoring request | `MONITORING` | `config` | `sync_time`, optional `component` (the target) |
//! | monitoring answer | `RESULT` | `result` | `sync_time` (echoed), `name`, `host`, `is_running`, `message`, `component` |
//! | kill request | `KILL` | `config` | optional `component` (the target) |
//! | kill done (to the requester) | `RESULT` | `result` | `component`, `stopped`, `unanswered` |
//! | error (to the parent, or a refusal) | `ERROR` | `error` | `code`, `message`, `component`, `command` |
//!
//! Ids: `id` names the conversation and is kept in the tag, because the router replaces a
//! request's `_id` with a node-unique one on each hop; a request also carries it as `_id` so it is
//! tracked and answered. Results and errors carry it only in the tag (they are not requests: an
//! `_id` would make the router wait for an answer to them). `pid` is the component that created
//! the message (null for an operator's tool), `creator` its name. Times are Unix milliseconds.
//!
//! Decoding is lenient where a shell user would be (`node/MONITORING sync_time=5` is a complete
//! request: spec, type and id come from the command and the envelope) and strict where the message
//! contradicts itself (a tag that disagrees with the command, the `_pid` or the `_creator`).

use crate::id::ComponentId;
use crate::Access;
use nodus_wire::Message;
use std::fmt;
use std::str::FromStr;

/// Command of a monitoring request.
pub const MONITORING: &str = "MONITORING";
/// Command of a kill request.
pub const KILL: &str = "KILL";
/// Command of a control result.
pub const RESULT: &str = "RESULT";
/// Command of a control error (also used by the node for its own errors, which carry no `spec`).
pub const ERROR: &str = "ERROR";

/// Every request command with the permission it needs: anyone allowed to read the node's
/// status may monitor; only an owner (local connection of the node's user, or an authenticated
/// peer) may kill.
pub const COMMANDS: [(&str, Access); 2] = [(MONITORING, Access::Status), (KILL, Access::Admin)];

/// Longest `name`, `host` or `creator` accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest free-text `message` accepted, in bytes (the seed asks for "a small comment").
pub const MAX_TEXT_BYTES: usize = 1024;
/// Most component ids listed in `unanswered`.
pub const MAX_UNANSWERED: usize = 1024;

/// The kind of control message (seed 000 `spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Spec {
    /// "How are you?": answered with name, host, is_running and a message.
    Monitoring,
    /// "Stop, and stop everything you started."
    Kill,
}

impl Spec {
    /// The seed's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Spec::Monitoring => "monitoring",
            Spec::Kill => "kill",
        }
    }

    /// The command of a request of this spec.
    pub fn command(self) -> &'static str {
        match self {
            Spec::Monitoring => MONITORING,
            Spec::Kill => KILL,
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Spec {
    type Err = String;

    /// Parses `monitoring` or `kill`; the error says which specs exist.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "monitoring" => Ok(Spec::Monitoring),
            "kill" => Ok(Spec::Kill),
            _ => Err(format!("unknown spec {:?}: use monitoring or kill", clip(s))),
        }
    }
}

/// Request, answer or error (the first word of the tag, and `message_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// A request (`config:` tag).
    Config,
    /// A successful answer (`result:` tag).
    Result,
    /// An error (`error:` tag, `message_type = error`).
    Error,
}

impl MessageType {
    /// The seed's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Config => "config",
            MessageType::Result => "result",
            MessageType::Error => "error",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageType {
    type Err = String;

    /// Parses `config`, `result` or `error`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "config" => Ok(MessageType::Config),
            "result" => Ok(MessageType::Result),
            "error" => Ok(MessageType::Error),
            _ => Err(format!("unknown message type {:?}: use config, result or error", clip(s))),
        }
    }
}

/// The seed's tag: `<message_type>:<spec>:<id>:<pid>:<creator>`, `pid` being `null` when unset.
/// The creator is the rest of the tag, so it may itself contain `:` (`node:service`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Request, result or error.
    pub message_type: MessageType,
    /// Monitoring or kill.
    pub spec: Spec,
    /// Conversation id (decimal, like `_id`).
    pub id: u64,
    /// Component that created the message.
    pub pid: Option<ComponentId>,
    /// Name of the creator.
    pub creator: String,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}:", self.message_type, self.spec, self.id)?;
        match self.pid {
            Some(pid) => write!(f, "{pid}")?,
            None => f.write_str("null")?,
        }
        write!(f, ":{}", self.creator)
    }
}

impl FromStr for Tag {
    type Err = ControlError;

    /// Parses a tag; fails naming the part that is wrong.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ControlError::BadTag { tag: clip(s), reason };
        let mut parts = s.splitn(5, ':');
        let (Some(mt), Some(spec), Some(id), Some(pid), Some(creator)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("use <message_type>:<spec>:<id>:<pid>:<creator>".into()));
        };
        let message_type = mt.parse().map_err(bad)?;
        let spec = spec.parse().map_err(bad)?;
        let id = parse_u64(id).ok_or_else(|| bad(format!("id {:?} is not a decimal number", clip(id))))?;
        let pid = match pid {
            "null" => None,
            p => Some(p.parse::<ComponentId>().map_err(|e| bad(e.to_string()))?),
        };
        if creator.len() > MAX_NAME_BYTES {
            return Err(bad(format!("creator is longer than {MAX_NAME_BYTES} bytes")));
        }
        Ok(Tag { message_type, spec, id, pid, creator: creator.to_string() })
    }
}

/// The seed's envelope, less `spec` (which the body implies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// Conversation id: chosen by the creator of a request, echoed by its results and errors.
    pub id: u64,
    /// The component that created this message (`null` for an operator's tool).
    pub pid: Option<ComponentId>,
    /// Who created it (free text, e.g. `node:service`).
    pub creator: String,
    /// Creation time, Unix ms (0 = unknown).
    pub created_at: i64,
    /// Expiry, Unix ms (0 = never).
    pub expires_at: i64,
}

/// A component's answer to monitoring (the seed's `result` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonitoringResult {
    /// The request's `sync_time`, echoed.
    pub sync_time: i64,
    /// The component's name, as its developer documents it.
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// True when it is doing work.
    pub is_running: bool,
    /// A short free comment.
    pub message: String,
}

/// What a control message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Monitoring request (`config { sync_time }`).
    Monitoring {
        /// The component asked; `None` means the addressed service itself.
        target: Option<ComponentId>,
        /// Time to synchronise on; echoed in the answer.
        sync_time: i64,
    },
    /// Monitoring answer.
    MonitoringResult {
        /// The component that answers.
        component: Option<ComponentId>,
        /// The seed's `result` object.
        result: MonitoringResult,
    },
    /// Kill request.
    Kill {
        /// The component to kill; `None` means the addressed service itself.
        target: Option<ComponentId>,
    },
    /// The kill finished (sent to whoever asked for it).
    KillResult {
        /// The component killed.
        component: Option<ComponentId>,
        /// True when it confirmed it stopped (false: it was given up on after its grace).
        stopped: bool,
        /// Components it started that did not report back in time.
        unanswered: Vec<ComponentId>,
    },
    /// An error (`message_type = error`): the report a killed component sends its parent, or a
    /// refusal of a control request.
    Error {
        /// Which kind of control conversation failed.
        spec: Spec,
        /// The component concerned.
        component: Option<ComponentId>,
        /// Machine-readable reason (`killed`, `unknown_component`, `expired`, ...).
        code: String,
        /// What happened and what to do, for people.
        message: String,
    },
}

/// One control message: the seed's envelope and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMessage {
    /// Envelope fields.
    pub header: Header,
    /// What it says.
    pub body: Body,
}

/// Why a message is not a valid control message. The text is what the daemon sends back in
/// `INVALID message=...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The command is not one of the control commands (or an `ERROR`/`RESULT` without a spec):
    /// not for the control plane.
    #[error("{command} is not a control message (use MONITORING, KILL, or RESULT/ERROR with spec=...)")]
    NotControl {
        /// The command seen.
        command: String,
    },
    /// A required parameter is absent.
    #[error("{command} needs {param}=<{what}>")]
    Missing {
        /// The command.
        command: String,
        /// The parameter.
        param: &'static str,
        /// What it holds.
        what: &'static str,
    },
    /// A parameter has a value that cannot be used.
    #[error("{command}: {param}={value:?} is invalid: {expected}")]
    Bad {
        /// The command.
        command: String,
        /// The parameter.
        param: &'static str,
        /// The value seen (clipped).
        value: String,
        /// What is expected.
        expected: String,
    },
    /// The tag cannot be parsed.
    #[error("invalid tag {tag:?}: {reason}")]
    BadTag {
        /// The tag seen (clipped).
        tag: String,
        /// What is wrong.
        reason: String,
    },
    /// The tag contradicts the rest of the message.
    #[error("tag {tag:?} contradicts the message: {reason}")]
    TagMismatch {
        /// The tag seen (clipped).
        tag: String,
        /// The contradiction.
        reason: String,
    },
}

impl ControlMessage {
    /// The seed's `spec`.
    pub fn spec(&self) -> Spec {
        match &self.body {
            Body::Monitoring { .. } | Body::MonitoringResult { .. } => Spec::Monitoring,
            Body::Kill { .. } | Body::KillResult { .. } => Spec::Kill,
            Body::Error { spec, .. } => *spec,
        }
    }

    /// Request, result or error.
    pub fn message_type(&self) -> MessageType {
        match &self.body {
            Body::Monitoring { .. } | Body::Kill { .. } => MessageType::Config,
            Body::MonitoringResult { .. } | Body::KillResult { .. } => MessageType::Result,
            Body::Error { .. } => MessageType::Error,
        }
    }

    /// The seed's tag for this message.
    pub fn tag(&self) -> Tag {
        Tag {
            message_type: self.message_type(),
            spec: self.spec(),
            id: self.header.id,
            pid: self.header.pid,
            creator: self.header.creator.clone(),
        }
    }

    /// The component this message is about (target of a request, subject of an answer).
    pub fn component(&self) -> Option<ComponentId> {
        match &self.body {
            Body::Monitoring { target, .. } | Body::Kill { target } => *target,
            Body::MonitoringResult { component, .. }
            | Body::KillResult { component, .. }
            | Body::Error { component, .. } => *component,
        }
    }

    /// A result or error answering `request`: same conversation id and expiry, created now by
    /// `pid`/`creator`.
    pub fn answer(request: &Header, pid: Option<ComponentId>, creator: &str, now: i64, body: Body) -> Self {
        let header = Header {
            id: request.id,
            pid,
            creator: creator.to_string(),
            created_at: now,
            expires_at: request.expires_at,
        };
        ControlMessage { header, body }
    }

    /// The wire message (no addressing; see [`ControlMessage::reply_to`] for answers).
    pub fn to_message(&self) -> Message {
        let command = match (&self.body, self.message_type()) {
            (_, MessageType::Config) => self.spec().command(),
            (_, MessageType::Result) => RESULT,
            (_, MessageType::Error) => ERROR,
        };
        let mut m = Message::new(command)
            .param("message_type", self.message_type())
            .param("spec", self.spec())
            .param("tag", self.tag());
        if let Some(c) = self.component() {
            m = m.param("component", c);
        }
        match &self.body {
            Body::Monitoring { sync_time, .. } => m = m.param("sync_time", sync_time),
            Body::MonitoringResult { result, .. } => {
                m = m
                    .param("sync_time", result.sync_time)
                    .param("name", &result.name)
                    .param("host", &result.host)
                    .param("is_running", result.is_running)
                    .param("message", &result.message);
            }
            Body::Kill { .. } => {}
            Body::KillResult { stopped, unanswered, .. } => {
                m = m.param("stopped", stopped);
                if !unanswered.is_empty() {
                    let list: Vec<String> = unanswered.iter().map(ToString::to_string).collect();
                    m = m.param("unanswered", list.join(","));
                }
            }
            Body::Error { spec, code, message, .. } => {
                m = m.param("code", code).param("message", message).param("command", spec.command());
            }
        }
        let env = &mut m.envelope;
        if self.message_type() == MessageType::Config {
            env.id = self.header.id;
        }
        env.pid = ComponentId::raw(self.header.pid);
        env.creator.clone_from(&self.header.creator);
        env.created_at = self.header.created_at;
        env.expires_at = self.header.expires_at;
        m
    }

    /// The wire message answering `request` (addressed to its sender, correlated by `reply_to`).
    pub fn reply_to(&self, request: &Message) -> Message {
        let mut m = self.to_message();
        let base = request.reply(&m.command);
        m.to = base.to;
        m.envelope.reply_to = base.envelope.reply_to;
        m
    }

    /// Reads a control message.
    ///
    /// Fails with [`ControlError::NotControl`] when `msg` is not for the control plane (any other
    /// command, or a `RESULT`/`ERROR` without `spec` or tag), and with another variant naming the
    /// parameter when it is a control message that cannot be used.
    pub fn from_message(msg: &Message) -> Result<Self, ControlError> {
        let command = msg.command.as_str();
        let tag = match msg.get("tag") {
            Some(t) => Some(t.parse::<Tag>()?),
            None => None,
        };
        let spec_param = match msg.get("spec") {
            Some(s) => Some(s.parse::<Spec>().map_err(|e| bad(command, "spec", s, e))?),
            None => None,
        };
        let (message_type, spec) = match command {
            MONITORING => (MessageType::Config, Spec::Monitoring),
            KILL => (MessageType::Config, Spec::Kill),
            RESULT | ERROR => {
                let Some(spec) = spec_param.or(tag.as_ref().map(|t| t.spec)) else {
                    return Err(ControlError::NotControl { command: command.to_string() });
                };
                let mt = if command == RESULT { MessageType::Result } else { MessageType::Error };
                (mt, spec)
            }
            _ => return Err(ControlError::NotControl { command: command.to_string() }),
        };
        if let Some(s) = spec_param {
            if s != spec {
                return Err(bad(command, "spec", s.as_str(), format!("{command} carries spec={spec}")));
            }
        }
        if let Some(mt) = msg.get("message_type") {
            if mt != message_type.as_str() {
                return Err(bad(command, "message_type", mt, format!("{command} is message_type={message_type}")));
            }
        }
        let header = header(msg, tag.as_ref(), message_type, spec)?;
        let component = optional_id(msg, "component")?;
        let body = match (message_type, spec) {
            (MessageType::Config, Spec::Monitoring) => {
                Body::Monitoring { target: component, sync_time: required_i64(msg, "sync_time")? }
            }
            (MessageType::Config, Spec::Kill) => Body::Kill { target: component },
            (MessageType::Result, Spec::Monitoring) => Body::MonitoringResult {
                component,
                result: MonitoringResult {
                    sync_time: required_i64(msg, "sync_time")?,
                    name: required_text(msg, "name", "component name", MAX_NAME_BYTES)?,
                    host: required_text(msg, "host", "host name", MAX_NAME_BYTES)?,
                    is_running: required_bool(msg, "is_running")?,
                    message: optional_text(msg, "message", MAX_TEXT_BYTES)?,
                },
            },
            (MessageType::Result, Spec::Kill) => Body::KillResult {
                component,
                stopped: required_bool(msg, "stopped")?,
                unanswered: id_list(msg, "unanswered")?,
            },
            (MessageType::Error, spec) => Body::Error {
                spec,
                component,
                code: required_text(msg, "code", "error code", MAX_NAME_BYTES)?,
                message: optional_text(msg, "message", MAX_TEXT_BYTES)?,
            },
        };
        Ok(ControlMessage { header, body })
    }
}

/// Builds the header from the envelope and the tag, refusing contradictions.
fn header(msg: &Message, tag: Option<&Tag>, mt: MessageType, spec: Spec) -> Result<Header, ControlError> {
    let env = &msg.envelope;
    let env_pid = ComponentId::new(env.pid);
    if env.creator.len() > MAX_NAME_BYTES {
        return Err(bad(&msg.command, "_creator", &env.creator, format!("at most {MAX_NAME_BYTES} bytes")));
    }
    let mut h = Header {
        id: if mt == MessageType::Config { env.id } else { env.reply_to },
        pid: env_pid,
        creator: env.creator.clone(),
        created_at: env.created_at,
        expires_at: env.expires_at,
    };
    if let Some(t) = tag {
        let mismatch = |reason: String| ControlError::TagMismatch { tag: clip(&t.to_string()), reason };
        if t.message_type != mt || t.spec != spec {
            return Err(mismatch(format!("{} is {mt}:{spec}", msg.command)));
        }
        if env_pid.is_some() && t.pid != env_pid {
            return Err(mismatch(format!("_pid is {}", env.pid)));
        }
        if !env.creator.is_empty() && t.creator != env.creator {
            return Err(mismatch(format!("_creator is {:?}", clip(&env.creator))));
        }
        h.id = t.id;
        h.pid = t.pid;
        h.creator.clone_from(&t.creator);
    }
    Ok(h)
}

fn bad(command: &str, param: &'static str, value: &str, expected: impl Into<String>) -> ControlError {
    ControlError::Bad { command: command.to_string(), param, value: clip(value), expected: expected.into() }
}

fn missing(msg: &Message, param: &'static str, what: &'static str) -> ControlError {
    ControlError::Missing { command: msg.command.clone(), param, what }
}

fn required_i64(msg: &Message, param: &'static str) -> Result<i64, ControlError> {
    let v = msg.get(param).ok_or_else(|| missing(msg, param, "Unix ms"))?;
    parse_i64(v).ok_or_else(|| bad(&msg.command, param, v, "a decimal number of Unix milliseconds"))
}

fn required_bool(msg: &Message, param: &'static str) -> Result<bool, ControlError> {
    match msg.get(param) {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(bad(&msg.command, param, v, "true or false")),
        None => Err(missing(msg, param, "true|false")),
    }
}

fn required_text(msg: &Message, param: &'static str, what: &'static str, max: usize) -> Result<String, ControlError> {
    let v = msg.get(param).ok_or_else(|| missing(msg, param, what))?;
    if v.is_empty() {
        return Err(bad(&msg.command, param, v, format!("a non-empty {what}")));
    }
    check_len(msg, param, v, max)
}

fn optional_text(msg: &Message, param: &'static str, max: usize) -> Result<String, ControlError> {
    check_len(msg, param, msg.get(param).unwrap_or(""), max)
}

fn check_len(msg: &Message, param: &'static str, v: &str, max: usize) -> Result<String, ControlError> {
    if v.len() > max {
        return Err(bad(&msg.command, param, v, format!("at most {max} bytes")));
    }
    Ok(v.to_string())
}

fn optional_id(msg: &Message, param: &'static str) -> Result<Option<ComponentId>, ControlError> {
    match msg.get(param) {
        None | Some("") => Ok(None),
        Some(v) => {
            v.parse().map(Some).map_err(|e: crate::id::BadComponentId| bad(&msg.command, param, v, e.to_string()))
        }
    }
}

fn id_list(msg: &Message, param: &'static str) -> Result<Vec<ComponentId>, ControlError> {
    let Some(v) = msg.get(param).filter(|v| !v.is_empty()) else { return Ok(Vec::new()) };
    let ids: Vec<&str> = v.split(',').collect();
    if ids.len() > MAX_UNANSWERED {
        return Err(bad(&msg.command, param, v, format!("at most {MAX_UNANSWERED} ids")));
    }
    ids.into_iter()
        .map(|s| s.parse().map_err(|_| bad(&msg.command, param, v, "a comma-separated list of component ids")))
        .collect()
}

fn parse_u64(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

fn parse_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// A value shortened for an error message, so a huge bad value does not make a huge error.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodus_wire::text;

    fn id(n: u64) -> ComponentId {
        ComponentId::new(n).unwrap()
    }

    fn request() -> ControlMessage {
        ControlMessage {
            header: Header { id: 7, pid: None, creator: "cli".into(), created_at: 1_000, expires_at: 6_000 },
            body: Body::Monitoring { target: Some(id(42)), sync_time: 1_000 },
        }
    }

    #[test]
    fn monitoring_request_shows_the_seed_tag_in_the_text_form() {
        let line = text::to_line(&request().to_message().to("node"));
        assert_eq!(
            line,
            "node/MONITORING component=42;message_type=config;spec=monitoring;sync_time=1000;\
             tag=config:monitoring:7:null:cli;_created_at=1000;_creator=cli;_expires_at=6000;_id=7"
        );
        let back = ControlMessage::from_message(&text::from_line(&line).unwrap()).unwrap();
        assert_eq!(back, request());
    }

    #[test]
    fn result_echoes_the_conversation_and_shows_its_tag() {
        let req = request();
        let mut req_msg = req.to_message().to("node");
        req_msg.from = nodus_wire::Address::new("a", "cli");
        // The router replaces the request's _id on the way; the tag keeps the creator's id.
        req_msg.envelope.id = 991;
        let got = ControlMessage::from_message(&req_msg).unwrap();
        assert_eq!(got.header.id, 7);
        let result = MonitoringResult {
            sync_time: 1_000,
            name: "billing".into(),
            host: "a".into(),
            is_running: true,
            message: "ok; 3 jobs".into(),
        };
        let answer = ControlMessage::answer(
            &got.header,
            Some(id(42)),
            "a:billing",
            1_005,
            Body::MonitoringResult { component: Some(id(42)), result: result.clone() },
        );
        let wire = answer.reply_to(&req_msg);
        assert_eq!(wire.command, "RESULT");
        assert_eq!(wire.envelope.reply_to, 991, "correlated on the hop's id");
        assert_eq!(wire.envelope.id, 0, "a result is not a request");
        assert_eq!(wire.to, req_msg.from);
        assert_eq!(wire.get("tag"), Some("result:monitoring:7:42:a:billing"));
        let line = text::to_line(&wire);
        let back = ControlMessage::from_message(&text::from_line(&line).unwrap()).unwrap();
        assert_eq!(back.header.id, 7);
        assert_eq!(back.header.creator, "a:billing");
        assert_eq!(back.body, Body::MonitoringResult { component: Some(id(42)), result });
    }

    #[test]
    fn every_body_round_trips() {
        let h = Header { id: 3, pid: Some(id(5)), creator: "b:svc".into(), created_at: 10, expires_at: 20 };
        let bodies = [
            Body::Monitoring { target: None, sync_time: -4 },
            Body::Kill { target: Some(id(9)) },
            Body::Kill { target: None },
            Body::KillResult { component: Some(id(9)), stopped: false, unanswered: vec![id(1), id(2)] },
            Body::KillResult { component: Some(id(9)), stopped: true, unanswered: vec![] },
            Body::Error { spec: Spec::Kill, component: Some(id(5)), code: "killed".into(), message: "x".into() },
            Body::Error {
                spec: Spec::Monitoring,
                component: None,
                code: "unknown_component".into(),
                message: "".into(),
            },
        ];
        for body in bodies {
            let m = ControlMessage { header: h.clone(), body };
            let wire = m.to_message();
            assert_eq!(ControlMessage::from_message(&wire).as_ref(), Ok(&m), "{}", text::to_line(&wire));
        }
    }

    #[test]
    fn kill_report_is_an_error_message_the_router_will_not_track() {
        let m = ControlMessage {
            header: Header { id: 9, pid: Some(id(42)), creator: "a:node".into(), created_at: 1, expires_at: 0 },
            body: Body::Error { spec: Spec::Kill, component: Some(id(42)), code: "killed".into(), message: "m".into() },
        };
        let wire = m.to_message();
        assert_eq!(wire.command, "ERROR");
        assert_eq!(wire.get("message_type"), Some("error"));
        assert_eq!(wire.get("tag"), Some("error:kill:9:42:a:node"));
        assert_eq!((wire.envelope.id, wire.envelope.pid), (0, 42));
    }

    #[test]
    fn a_shell_users_minimal_request_is_complete() {
        let msg = text::from_line("node/MONITORING sync_time=5;_id=3").unwrap();
        let m = ControlMessage::from_message(&msg).unwrap();
        assert_eq!(m.header.id, 3);
        assert_eq!(m.body, Body::Monitoring { target: None, sync_time: 5 });
        let msg = text::from_line("node/KILL component=12").unwrap();
        assert_eq!(ControlMessage::from_message(&msg).unwrap().body, Body::Kill { target: Some(id(12)) });
    }

    #[test]
    fn other_messages_are_not_control() {
        for line in ["node/STATUS", "RESULT chunks=1", "ERROR code=timeout;message=x"] {
            let msg = text::from_line(line).unwrap();
            assert!(matches!(ControlMessage::from_message(&msg), Err(ControlError::NotControl { .. })), "{line}");
        }
    }

    #[test]
    fn bad_messages_get_errors_that_name_the_problem() {
        let cases = [
            ("MONITORING", "MONITORING needs sync_time=<Unix ms>"),
            ("MONITORING sync_time=soon", "sync_time=\"soon\" is invalid"),
            ("MONITORING sync_time=1;component=0", "component=\"0\" is invalid"),
            ("MONITORING sync_time=1;spec=kill", "MONITORING carries spec=monitoring"),
            ("KILL message_type=result", "KILL is message_type=config"),
            ("KILL spec=reboot", "unknown spec \"reboot\""),
            ("KILL tag=config:kill", "use <message_type>:<spec>:<id>:<pid>:<creator>"),
            ("KILL tag=config:kill:x:null:cli", "id \"x\" is not a decimal number"),
            ("KILL tag=config:kill:1:-2:cli", "invalid component id \"-2\""),
            ("KILL tag=result:kill:1:null:cli", "KILL is config:kill"),
            ("KILL tag=config:kill:1:5:cli;_pid=6", "_pid is 6"),
            ("KILL tag=config:kill:1:5:cli;_creator=eve", "_creator is \"eve\""),
            ("RESULT spec=monitoring;sync_time=1;name=n;host=h", "RESULT needs is_running=<true|false>"),
            ("RESULT spec=monitoring;sync_time=1;name=n;host=h;is_running=yes", "true or false"),
            ("RESULT spec=monitoring;sync_time=1;name=;host=h;is_running=true", "a non-empty component name"),
            ("RESULT spec=kill;stopped=true;unanswered=1,x", "comma-separated list of component ids"),
            ("ERROR spec=kill", "ERROR needs code=<error code>"),
        ];
        for (line, want) in cases {
            let msg = text::from_line(line).unwrap();
            let err = ControlMessage::from_message(&msg).expect_err(line).to_string();
            assert!(err.contains(want), "{line}: {err:?} should contain {want:?}");
        }
    }

    #[test]
    fn oversized_values_are_refused_and_clipped_in_the_error() {
        let big = "x".repeat(MAX_TEXT_BYTES + 1);
        let msg = Message::new("RESULT")
            .param("spec", "monitoring")
            .param("sync_time", 1)
            .param("name", "n")
            .param("host", "h")
            .param("is_running", true)
            .param("message", &big);
        let err = ControlMessage::from_message(&msg).unwrap_err().to_string();
        assert!(err.contains("at most 1024 bytes") && err.len() < 200, "{err}");
    }

    #[test]
    fn huge_component_ids_make_short_errors() {
        // Found by the `control` fuzz target: the id's own error repeated the whole value.
        let huge = "9x".repeat(600);
        let msg = Message::new(KILL).param("component", &huge);
        let err = ControlMessage::from_message(&msg).unwrap_err().to_string();
        assert!(err.len() < 300, "{} bytes: {err}", err.len());
        let err = format!("config:kill:1:{huge}:cli").parse::<Tag>().unwrap_err().to_string();
        assert!(err.len() < 300, "{} bytes: {err}", err.len());
    }

    #[test]
    fn tag_creator_may_contain_colons() {
        let t: Tag = "result:kill:5:null:node-a:billing".parse().unwrap();
        assert_eq!(t.creator, "node-a:billing");
        assert_eq!(t.to_string(), "result:kill:5:null:node-a:billing");
    }
}
