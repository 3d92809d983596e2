//! The `FLAG_*` messages, so any program (a shell script on the text form included) can raise and
//! lower flags through its node's `flags` service.
//!
//! | request | parameters | permission | reply |
//! |---|---|---|---|
//! | `FLAG_UP` | `unit`, `section`, `name`, `message`; optional `priority` (0–100), `manual_down` (yes/no), `tags` (comma or space separated), `source_file`, `function`, `line` | `send` | `FLAG_IS_UP unit;section;name;count;new` |
//! | `FLAG_DOWN` | `unit`, `section`, `name` (automatic lowering) | `send` | `FLAG_IS_DOWN unit;section;name;lowered` |
//! | `FLAG_CLEAR` | `unit`, `section`, `name` (manual lowering, any flag) | `admin` | `FLAG_IS_DOWN ...` |
//! | `FLAG_LIST` | none | `status` | `FLAGS count;raised` + JSON array payload |
//! | `FLAG_STATUS` | optional `unit`, `section`, `name` | `status` | `FLAG_STATUS count;raised[;unit;section;name]` |
//!
//! ```text
//! flags/FLAG_UP unit=backup;section=nightly;name=failed;message=disk full;priority=60;tags=disk,backup
//! <a:flags backup/FLAG_IS_UP count=1;name=failed;new=yes;section=nightly;unit=backup
//! ```
//!
//! A malformed request is answered `INVALID command=...;message=...`, a refusal
//! `ERROR code=<manual_down|too_many_flags|reserved|storage>;command=...;message=...`
//! ([`FlagError::to_reply`]). Booleans are `yes`/`no` as in communicatord (`true`/`false`
//! accepted).

use super::{clip, Flag, FlagError, FlagKey, Raise, DEFAULT_PRIORITY, MAX_PRIORITY};
use crate::Access;
use nodus_wire::Message;

/// Raise a flag.
pub const FLAG_UP: &str = "FLAG_UP";
/// Lower a flag automatically (the condition cleared).
pub const FLAG_DOWN: &str = "FLAG_DOWN";
/// Lower any flag, manual-down ones included (an operator's action).
pub const FLAG_CLEAR: &str = "FLAG_CLEAR";
/// List the raised flags.
pub const FLAG_LIST: &str = "FLAG_LIST";
/// Count the raised flags / tell whether one is raised.
pub const FLAG_STATUS: &str = "FLAG_STATUS";
/// Reply to `FLAG_UP`.
pub const FLAG_IS_UP: &str = "FLAG_IS_UP";
/// Reply to `FLAG_DOWN` and `FLAG_CLEAR`.
pub const FLAG_IS_DOWN: &str = "FLAG_IS_DOWN";
/// Reply to `FLAG_LIST`.
pub const FLAGS: &str = "FLAGS";

/// Every request command with the permission it needs, for the service to declare when it
/// attaches.
pub const COMMANDS: [(&str, Access); 5] = [
    (FLAG_UP, Access::Send),
    (FLAG_DOWN, Access::Send),
    (FLAG_CLEAR, Access::Admin),
    (FLAG_LIST, Access::Status),
    (FLAG_STATUS, Access::Status),
];

/// One request to the `flags` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagRequest {
    /// `FLAG_UP`.
    Up(Raise),
    /// `FLAG_DOWN`.
    Down(FlagKey),
    /// `FLAG_CLEAR`.
    Clear(FlagKey),
    /// `FLAG_LIST`.
    List,
    /// `FLAG_STATUS`, about every flag or one.
    Status(Option<FlagKey>),
}

/// One answer of the `flags` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagReply {
    /// The flag is up.
    IsUp {
        /// Which.
        key: FlagKey,
        /// Its raise count.
        count: u64,
        /// True when it was not raised before.
        new: bool,
    },
    /// The flag is down.
    IsDown {
        /// Which.
        key: FlagKey,
        /// False when it was not raised.
        lowered: bool,
    },
    /// The raised flags.
    List(Vec<Flag>),
    /// How many flags are raised, and whether the one asked about (or any) is.
    Status {
        /// The flag asked about, if any.
        key: Option<FlagKey>,
        /// Number of raised flags.
        count: usize,
        /// Whether that flag (or, without one, any flag) is raised.
        raised: bool,
    },
}

impl FlagRequest {
    /// The permission the request needs.
    pub fn access(&self) -> Access {
        match self {
            FlagRequest::Up(_) | FlagRequest::Down(_) => Access::Send,
            FlagRequest::Clear(_) => Access::Admin,
            FlagRequest::List | FlagRequest::Status(_) => Access::Status,
        }
    }

    /// Reads a request.
    ///
    /// Fails with [`FlagError::BadParam`] (`param = "command"`) for a command that is not a flag
    /// request, otherwise with the error naming the parameter to fix.
    pub fn from_message(msg: &Message) -> Result<Self, FlagError> {
        let command = msg.command.as_str();
        Ok(match command {
            FLAG_UP => {
                let key = key(msg)?;
                let message = msg.get("message").ok_or_else(|| missing(msg, "message", "what is wrong"))?;
                let mut r = Raise::new(key, message);
                if let Some(p) = msg.get("priority") {
                    r.priority = parse_priority(command, p)?;
                } else {
                    r.priority = DEFAULT_PRIORITY;
                }
                if let Some(m) = msg.get("manual_down") {
                    r.manual_down = parse_yes_no(command, "manual_down", m)?;
                }
                if let Some(t) = msg.get("tags") {
                    r.tags = split_tags(t).map(String::from).collect();
                }
                r.source_file = msg.get("source_file").unwrap_or("").to_string();
                r.function = msg.get("function").unwrap_or("").to_string();
                if let Some(l) = msg.get("line") {
                    r.line = l.parse().map_err(|_| bad(command, "line", l, "a line number"))?;
                }
                FlagRequest::Up(r.checked()?)
            }
            FLAG_DOWN => FlagRequest::Down(key(msg)?),
            FLAG_CLEAR => FlagRequest::Clear(key(msg)?),
            FLAG_LIST => FlagRequest::List,
            FLAG_STATUS => {
                let given = ["unit", "section", "name"].iter().filter(|p| msg.get(p).is_some()).count();
                match given {
                    0 => FlagRequest::Status(None),
                    3 => FlagRequest::Status(Some(key(msg)?)),
                    _ => return Err(bad(command, "name", "", "all of unit, section and name, or none")),
                }
            }
            _ => {
                return Err(bad(
                    command,
                    "command",
                    command,
                    "FLAG_UP, FLAG_DOWN, FLAG_CLEAR, FLAG_LIST or FLAG_STATUS",
                ))
            }
        })
    }

    /// The request as a message (no destination: send it to the `flags` service).
    pub fn to_message(&self) -> Message {
        match self {
            FlagRequest::Up(r) => {
                let mut m = with_key(Message::new(FLAG_UP), &r.key)
                    .param("message", &r.message)
                    .param("priority", r.priority)
                    .param("manual_down", yes_no(r.manual_down));
                if !r.tags.is_empty() {
                    m = m.param("tags", r.tags.iter().cloned().collect::<Vec<_>>().join(","));
                }
                if !r.source_file.is_empty() {
                    m = m.param("source_file", &r.source_file);
                }
                if !r.function.is_empty() {
                    m = m.param("function", &r.function);
                }
                if r.line != 0 {
                    m = m.param("line", r.line);
                }
                m
            }
            FlagRequest::Down(k) => with_key(Message::new(FLAG_DOWN), k),
            FlagRequest::Clear(k) => with_key(Message::new(FLAG_CLEAR), k),
            FlagRequest::List => Message::new(FLAG_LIST),
            FlagRequest::Status(None) => Message::new(FLAG_STATUS),
            FlagRequest::Status(Some(k)) => with_key(Message::new(FLAG_STATUS), k),
        }
    }
}

impl FlagReply {
    /// The reply to `request` (addressed to its sender, correlated by `reply_to`).
    pub fn reply_to(&self, request: &Message) -> Message {
        match self {
            FlagReply::IsUp { key, count, new } => {
                with_key(request.reply(FLAG_IS_UP), key).param("count", count).param("new", yes_no(*new))
            }
            FlagReply::IsDown { key, lowered } => {
                with_key(request.reply(FLAG_IS_DOWN), key).param("lowered", yes_no(*lowered))
            }
            FlagReply::List(flags) => {
                let json = serde_json::to_vec(flags).unwrap_or_else(|_| b"[]".to_vec());
                request
                    .reply(FLAGS)
                    .param("count", flags.len())
                    .param("raised", yes_no(!flags.is_empty()))
                    .with_payload(json)
            }
            FlagReply::Status { key, count, raised } => {
                let m = request.reply(FLAG_STATUS).param("count", count).param("raised", yes_no(*raised));
                match key {
                    Some(k) => with_key(m, k),
                    None => m,
                }
            }
        }
    }

    /// Reads a reply (the client's side).
    ///
    /// Fails with [`FlagError::Refused`] for an `ERROR` or `INVALID` answer, and with
    /// [`FlagError::BadParam`] when the reply is not one of the flag replies or is malformed.
    pub fn from_message(msg: &Message) -> Result<Self, FlagError> {
        let command = msg.command.as_str();
        Ok(match command {
            "ERROR" | "INVALID" | "UNKNOWN" | "SERVICE_UNAVAILABLE" | "QUITTING" => {
                let code = if command == "ERROR" { msg.get("code").unwrap_or("error") } else { command };
                return Err(FlagError::Refused {
                    code: code.to_string(),
                    message: msg.get("message").or(msg.get("reason")).unwrap_or("").to_string(),
                });
            }
            FLAG_IS_UP => FlagReply::IsUp {
                key: key(msg)?,
                count: msg
                    .get("count")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| missing(msg, "count", "raise count"))?,
                new: parse_yes_no(command, "new", msg.get("new").unwrap_or("no"))?,
            },
            FLAG_IS_DOWN => FlagReply::IsDown {
                key: key(msg)?,
                lowered: parse_yes_no(command, "lowered", msg.get("lowered").unwrap_or("no"))?,
            },
            FLAGS => {
                let flags: Vec<Flag> = serde_json::from_slice(&msg.payload)
                    .map_err(|_| bad(command, "payload", "", "a JSON array of flags"))?;
                FlagReply::List(flags)
            }
            FLAG_STATUS => FlagReply::Status {
                key: if msg.get("unit").is_some() { Some(key(msg)?) } else { None },
                count: msg
                    .get("count")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| missing(msg, "count", "flag count"))?,
                raised: parse_yes_no(command, "raised", msg.get("raised").unwrap_or("no"))?,
            },
            _ => return Err(bad(command, "command", command, "a flag reply")),
        })
    }
}

impl FlagError {
    /// The answer to `request` carrying this error: `INVALID` for malformed input, otherwise
    /// `ERROR code=<code>`; both with `command` and `message`.
    pub fn to_reply(&self, request: &Message) -> Message {
        let m = if self.is_invalid_input() {
            request.reply("INVALID")
        } else {
            request.reply("ERROR").param("code", self.code())
        };
        m.param("command", &request.command).param("message", self.to_string())
    }
}

fn key(msg: &Message) -> Result<FlagKey, FlagError> {
    let part = |p: &'static str| msg.get(p).ok_or_else(|| missing(msg, p, "a flag name part"));
    FlagKey::new(part("unit")?, part("section")?, part("name")?)
}

fn with_key(m: Message, k: &FlagKey) -> Message {
    m.param("unit", k.unit()).param("section", k.section()).param("name", k.name())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn parse_yes_no(command: &str, param: &'static str, v: &str) -> Result<bool, FlagError> {
    match v {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(bad(command, param, v, "yes or no")),
    }
}

fn parse_priority(command: &str, v: &str) -> Result<u8, FlagError> {
    match v.parse::<i64>() {
        Ok(p) if (0..=i64::from(MAX_PRIORITY)).contains(&p) => Ok(p as u8),
        Ok(p) => Err(FlagError::BadPriority(p)),
        Err(_) => Err(bad(command, "priority", v, "a number from 0 to 100")),
    }
}

/// Tags as the reference tool splits them: on commas and spaces.
pub fn split_tags(s: &str) -> impl Iterator<Item = &str> {
    s.split([',', ' ']).filter(|t| !t.is_empty())
}

fn missing(msg: &Message, param: &'static str, what: &'static str) -> FlagError {
    FlagError::Missing { command: msg.command.clone(), param, what }
}

fn bad(command: &str, param: &'static str, value: &str, expected: &'static str) -> FlagError {
    FlagError::BadParam { command: command.to_string(), param, value: clip(value), expected }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodus_wire::text;

    fn parse(line: &str) -> Result<FlagRequest, FlagError> {
        FlagRequest::from_message(&text::from_line(line).unwrap())
    }

    #[test]
    fn a_shell_script_raises_a_flag_in_text_form() {
        let r = parse("flags/FLAG_UP unit=Backup;section=nightly;name=failed;message=disk full;priority=60;tags=disk backup,Nightly;manual_down=yes;line=12").unwrap();
        let FlagRequest::Up(r) = r else { panic!("not an up") };
        assert_eq!(r.key.to_string(), "backup/nightly/failed");
        assert_eq!((r.priority, r.manual_down, r.line), (60, true, 12));
        assert_eq!(r.tags, ["backup", "disk", "nightly"].map(String::from).into());
        assert_eq!(FlagRequest::from_message(&FlagRequest::Up(r.clone()).to_message()), Ok(FlagRequest::Up(r)));
    }

    #[test]
    fn every_request_round_trips() {
        let k = FlagKey::new("a", "b", "c").unwrap();
        for req in [
            FlagRequest::Down(k.clone()),
            FlagRequest::Clear(k.clone()),
            FlagRequest::List,
            FlagRequest::Status(None),
            FlagRequest::Status(Some(k.clone())),
            FlagRequest::Up(Raise::new(k, "m")),
        ] {
            assert_eq!(FlagRequest::from_message(&req.to_message()).as_ref(), Ok(&req));
        }
    }

    #[test]
    fn bad_requests_get_clear_invalid_answers() {
        let cases = [
            ("FLAG_UP unit=a;section=b;name=c", "FLAG_UP needs message=<what is wrong>"),
            ("FLAG_UP section=b;name=c;message=m", "FLAG_UP needs unit=<a flag name part>"),
            ("FLAG_UP unit=a_1;section=b;name=c;message=m", "invalid flag unit \"a_1\""),
            ("FLAG_UP unit=a;section=b;name=c;message=m;priority=101", "priority 101 is out of range"),
            ("FLAG_UP unit=a;section=b;name=c;message=m;priority=high", "a number from 0 to 100"),
            ("FLAG_UP unit=a;section=b;name=c;message=m;manual_down=maybe", "yes or no"),
            ("FLAG_UP unit=a;section=b;name=c;message=m;tags=x_y", "invalid flag tag"),
            ("FLAG_UP unit=a;section=b;name=c;message=m;line=-3", "a line number"),
            ("FLAG_DOWN unit=a;section=b", "FLAG_DOWN needs name="),
            ("FLAG_STATUS unit=a", "all of unit, section and name, or none"),
            ("FLAG_RAISE unit=a", "FLAG_UP, FLAG_DOWN, FLAG_CLEAR, FLAG_LIST or FLAG_STATUS"),
        ];
        for (line, want) in cases {
            let msg = text::from_line(line).unwrap();
            let e = FlagRequest::from_message(&msg).expect_err(line);
            assert!(e.to_string().contains(want), "{line}: {e}");
            let reply = e.to_reply(&msg);
            assert_eq!(reply.command, "INVALID", "{line}");
            assert_eq!(reply.get("command"), Some(msg.command.as_str()));
        }
    }

    #[test]
    fn refusals_are_errors_with_codes() {
        let req = Message::new(FLAG_DOWN).with_id(4);
        let k = FlagKey::new("a", "b", "c").unwrap();
        let reply = FlagError::ManualDown(k).to_reply(&req);
        assert_eq!((reply.command.as_str(), reply.get("code")), ("ERROR", Some("manual_down")));
        assert_eq!(reply.envelope.reply_to, 4);
        assert!(reply.get("message").unwrap().contains("nodus flags down --manual a b c"));
        let back = FlagReply::from_message(&reply).unwrap_err();
        assert_eq!(back.code(), "manual_down");
    }

    #[test]
    fn replies_round_trip() {
        let req = Message::new(FLAG_LIST).with_id(1);
        let k = FlagKey::new("a", "b", "c").unwrap();
        let mut set = super::super::FlagSet::new(10, "h", "v");
        set.raise(Raise::new(k.clone(), "m").tag("t"), 5).unwrap();
        let flags: Vec<Flag> = set.list().into_iter().cloned().collect();
        for reply in [
            FlagReply::IsUp { key: k.clone(), count: 3, new: false },
            FlagReply::IsDown { key: k.clone(), lowered: true },
            FlagReply::List(flags),
            FlagReply::List(vec![]),
            FlagReply::Status { key: None, count: 2, raised: true },
            FlagReply::Status { key: Some(k), count: 2, raised: false },
        ] {
            let m = reply.reply_to(&req);
            assert_eq!(m.envelope.reply_to, 1);
            assert_eq!(FlagReply::from_message(&m).as_ref(), Ok(&reply), "{}", text::to_line(&m));
        }
    }

    #[test]
    fn permissions_match_the_access_model() {
        let k = FlagKey::new("a", "b", "c").unwrap();
        assert_eq!(FlagRequest::Clear(k.clone()).access(), Access::Admin);
        assert_eq!(FlagRequest::Down(k).access(), Access::Send);
        assert_eq!(FlagRequest::List.access(), Access::Status);
        for (cmd, access) in COMMANDS {
            let m = Message::new(cmd).param("unit", "a").param("section", "b").param("name", "c").param("message", "m");
            assert_eq!(FlagRequest::from_message(&m).unwrap().access(), access, "{cmd}");
        }
    }
}
