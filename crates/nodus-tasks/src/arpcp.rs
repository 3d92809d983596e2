//! The arpcp wire format (seed 004), pure: one JSON request line in, one JSON answer line out.
//!
//! Request: `{"method", "version", "remote_procedure", "remote_procedure_args", "atask_id",
//! "atask_status"}`, methods compared case-insensitively. Answer: `{"code": <integer>,
//! "description": <string>, "data": <any JSON>}` followed by `\r\n`. [`decode_request`] is total:
//! any bytes give a [`Request`] or the [`Answer`] that refuses them (codes 200, 201, 202, 205,
//! 206). Procedure and id lookups (203, 204, 205) and execution (100, 300, 400) belong to the
//! service that answers the request.
//!
//! nodus extends `task` and `atask` with two optional fields the reference never sends (and its
//! server ignores, as it ignores every unknown field): `expires_at`, the task's deadline as Unix
//! milliseconds (a task not started by then never runs; already past on arrival, the request is
//! refused with 200), and `pid`, the id of the parent task submitting this one (killing the
//! parent kills it).

use std::fmt;

use serde_json::Value;

use crate::task::{json, json_null, Json, TaskId, UnixMs};

/// The arpcp port of the reference implementation (and nodus's default).
pub const DEFAULT_PORT: u16 = 7018;

/// The seed's status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 100: success; an async task was created.
    Ok,
    /// 200: the request is broken (not JSON, not an object, bad UTF-8, too long, bad field).
    Malformed,
    /// 201: unknown method.
    UnknownMethod,
    /// 202: a field the method needs is missing.
    MissingField,
    /// 203: the procedure does not exist.
    UnknownProcedure,
    /// 204: wrong arguments for the procedure (count or type).
    BadArguments,
    /// 205: unknown (or malformed) task id.
    UnknownTask,
    /// 206: another protocol version.
    Version,
    /// 300: internal error (store unavailable, node shutting down, overloaded).
    Internal,
    /// 400: the procedure ran and failed.
    ProcedureFailed,
}

impl Code {
    /// The integer on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Code::Ok => 100,
            Code::Malformed => 200,
            Code::UnknownMethod => 201,
            Code::MissingField => 202,
            Code::UnknownProcedure => 203,
            Code::BadArguments => 204,
            Code::UnknownTask => 205,
            Code::Version => 206,
            Code::Internal => 300,
            Code::ProcedureFailed => 400,
        }
    }

    /// The code for an integer, if it is one of the seed's.
    pub fn from_u16(n: u16) -> Option<Code> {
        [
            Code::Ok,
            Code::Malformed,
            Code::UnknownMethod,
            Code::MissingField,
            Code::UnknownProcedure,
            Code::BadArguments,
            Code::UnknownTask,
            Code::Version,
            Code::Internal,
            Code::ProcedureFailed,
        ]
        .into_iter()
        .find(|c| c.as_u16() == n)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// The methods, compared case-insensitively on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `task`: run a procedure and wait for its result.
    Task,
    /// `atask`: submit a procedure, answer its task id at once.
    Atask,
    /// `get`: a task's status or result.
    Get,
    /// `signal`: change a task's status.
    Signal,
    /// `id`: this node's id.
    Id,
    /// `procedures`: the procedures this node runs.
    Procedures,
}

impl Method {
    const ALL: [(&'static str, Method); 6] = [
        ("task", Method::Task),
        ("atask", Method::Atask),
        ("get", Method::Get),
        ("signal", Method::Signal),
        ("id", Method::Id),
        ("procedures", Method::Procedures),
    ];

    /// The method for a name in any case.
    pub fn parse(name: &str) -> Option<Method> {
        Self::ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, m)| *m)
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| *m == self).map_or("", |(n, _)| n)
    }
}

/// The SIGNAL statuses of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalStatus {
    /// `accepted`: the task is taken and will run soon (no change: the task must exist).
    Accepted,
    /// `interrupted`: its execution is interrupted (a running attempt is cancelled).
    Interrupted,
    /// `done`: it is finished; with no result recorded, the result is `null`.
    Done,
    /// `client_error`: bad data from the client; the same as `terminate`.
    ClientError,
    /// `terminate`: delete everything stored about it.
    Terminate,
}

impl SignalStatus {
    const ALL: [(&'static str, SignalStatus); 5] = [
        ("accepted", SignalStatus::Accepted),
        ("interrupted", SignalStatus::Interrupted),
        ("done", SignalStatus::Done),
        ("client_error", SignalStatus::ClientError),
        ("terminate", SignalStatus::Terminate),
    ];

    /// The status for a name in any case.
    pub fn parse(name: &str) -> Option<SignalStatus> {
        Self::ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, s)| *s)
    }

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, s)| *s == self).map_or("", |(n, _)| n)
    }
}

/// The optional fields nodus adds to `task` and `atask` (absent from the reference's requests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extension {
    /// `expires_at`: the latest time (Unix ms) the task may start.
    pub expires_at: Option<UnixMs>,
    /// `pid`: the parent task.
    pub pid: Option<TaskId>,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Run `procedure` with `args` and answer its result.
    Task {
        /// `APP.EVENT`.
        procedure: String,
        /// Positional arguments.
        args: Vec<Value>,
        /// nodus's optional fields.
        extra: Extension,
    },
    /// Submit `procedure` with `args`; answer the task id.
    Atask {
        /// `APP.EVENT`.
        procedure: String,
        /// Positional arguments.
        args: Vec<Value>,
        /// nodus's optional fields.
        extra: Extension,
    },
    /// A task's status or result.
    Get {
        /// The task.
        id: TaskId,
    },
    /// Change a task's status.
    Signal {
        /// The task.
        id: TaskId,
        /// The new status.
        status: SignalStatus,
    },
    /// This node's id.
    Id,
    /// The procedure names.
    Procedures,
}

/// One answer line.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub code: Code,
    /// `OK`, a status word, or what was wrong.
    pub description: String,
    /// The payload (`null` when there is none).
    pub data: Json,
}

impl Answer {
    /// Code 100 with `description` and `data`.
    pub fn ok(description: impl Into<String>, data: Json) -> Answer {
        Answer { code: Code::Ok, description: description.into(), data }
    }

    /// An error answer: `code`, what was wrong, `data` null.
    pub fn error(code: Code, description: impl Into<String>) -> Answer {
        Answer { code, description: description.into(), data: json_null() }
    }

    /// A string payload.
    pub fn string_data(s: &str) -> Json {
        json(&serde_json::to_string(s).expect("a string serializes")).expect("a serialized string is JSON")
    }

    /// Writes the answer as one line ending in `\r\n`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        #[derive(serde::Serialize)]
        struct Wire<'a> {
            code: u16,
            description: &'a str,
            data: &'a serde_json::value::RawValue,
        }
        let text = self.data.get();
        // Raw JSON may span lines (a worker's pretty-printed result); the answer must not.
        let compact;
        let data: &serde_json::value::RawValue = if text.contains(['\n', '\r']) {
            compact = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| serde_json::value::to_raw_value(&v).ok())
                .unwrap_or_else(json_null);
            &compact
        } else {
            &self.data
        };
        let wire = Wire { code: self.code.as_u16(), description: &self.description, data };
        serde_json::to_writer(&mut *out, &wire).expect("writing JSON to a Vec cannot fail");
        out.extend_from_slice(b"\r\n");
    }

    /// Parses an answer line (for clients and tests).
    ///
    /// # Errors
    /// When the line is not an answer object with an integer code of the seed's table.
    pub fn decode(line: &[u8]) -> Result<Answer, String> {
        let v: Value = serde_json::from_slice(line).map_err(|e| format!("answer is not JSON: {e}"))?;
        let code = v
            .get("code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
            .and_then(Code::from_u16)
            .ok_or("answer has no known integer code")?;
        let description = v.get("description").and_then(Value::as_str).unwrap_or_default().to_string();
        let data = serde_json::value::to_raw_value(v.get("data").unwrap_or(&Value::Null)).map_err(|e| e.to_string())?;
        Ok(Answer { code, description, data })
    }
}

/// The protocol versions nodus accepts: the seed's `1.0`, its GET example's `ARPCP/1.0`, and
/// `0.3` sent by the reference's clients of the seed's era.
pub const VERSIONS: [&str; 3] = ["1.0", "ARPCP/1.0", "0.3"];

fn version_ok(v: &Value) -> bool {
    match v {
        Value::String(s) => VERSIONS.iter().any(|ok| ok.eq_ignore_ascii_case(s.trim())),
        Value::Number(n) => n.as_f64().is_some_and(|f| f == 1.0 || f == 0.3),
        _ => false,
    }
}

/// Decodes one request line (without its line ending).
///
/// # Errors
/// The answer refusing it: 200 (bad UTF-8, not JSON, not an object, a field of the wrong
/// type), 201 (unknown method), 202 (a needed field missing, named), 204 (arguments that are
/// not an array), 205 (a malformed task id), 206 (another version).
pub fn decode_request(line: &[u8]) -> Result<Request, Answer> {
    let text = std::str::from_utf8(line)
        .map_err(|e| Answer::error(Code::Malformed, format!("the request is not valid UTF-8 ({e})")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Answer::error(Code::Malformed, format!("the request is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Answer::error(Code::Malformed, "the request must be a JSON object"));
    };
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let missing = |name: &str, method: &str| {
        Answer::error(Code::MissingField, format!("the field {name:?} is missing (method {method:?} needs it)"))
    };
    let method_value = field("method").ok_or_else(|| missing("method", "any"))?;
    let method_name =
        method_value.as_str().ok_or_else(|| Answer::error(Code::Malformed, "the field \"method\" must be a string"))?;
    let version = field("version").ok_or_else(|| missing("version", method_name))?;
    if !version_ok(version) {
        return Err(Answer::error(
            Code::Version,
            format!("protocol version {version} is not supported; use \"1.0\" (also accepted: \"ARPCP/1.0\", \"0.3\")"),
        ));
    }
    let method = Method::parse(method_name).ok_or_else(|| {
        Answer::error(
            Code::UnknownMethod,
            format!("unknown method {method_name:?}; use task, atask, get, signal, id or procedures"),
        )
    })?;
    let name = method.name();
    let procedure = || -> Result<String, Answer> {
        let p = field("remote_procedure").ok_or_else(|| missing("remote_procedure", name))?;
        p.as_str()
            .map(str::to_string)
            .ok_or_else(|| Answer::error(Code::Malformed, "the field \"remote_procedure\" must be a string"))
    };
    let args = || -> Result<Vec<Value>, Answer> {
        match field("remote_procedure_args") {
            None => Err(missing("remote_procedure_args", name)),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(other) => Err(Answer::error(
                Code::BadArguments,
                format!("\"remote_procedure_args\" must be a JSON array of positional arguments, not {other}"),
            )),
        }
    };
    let id = || -> Result<TaskId, Answer> {
        let v = field("atask_id").ok_or_else(|| missing("atask_id", name))?;
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Answer::error(Code::UnknownTask, format!("{v} is not a task id")))
    };
    let extra = || -> Result<Extension, Answer> {
        let expires_at = match field("expires_at") {
            None => None,
            Some(v) => Some(v.as_i64().map(UnixMs::from_i64).ok_or_else(|| {
                Answer::error(
                    Code::Malformed,
                    format!("\"expires_at\" must be an integer (Unix milliseconds), not {v}"),
                )
            })?),
        };
        let pid = match field("pid") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Answer::error(Code::UnknownTask, format!("pid {v} is not a task id")))?,
            ),
        };
        Ok(Extension { expires_at, pid })
    };
    Ok(match method {
        Method::Task => Request::Task { procedure: procedure()?, args: args()?, extra: extra()? },
        Method::Atask => Request::Atask { procedure: procedure()?, args: args()?, extra: extra()? },
        Method::Get => Request::Get { id: id()? },
        Method::Signal => {
            let id = id()?;
            let s = field("atask_status").ok_or_else(|| missing("atask_status", name))?;
            let status = s.as_str().and_then(SignalStatus::parse).ok_or_else(|| {
                Answer::error(
                    Code::Malformed,
                    format!("atask_status {s} is not one of accepted, interrupted, done, client_error, terminate"),
                )
            })?;
            Request::Signal { id, status }
        }
        Method::Id => Request::Id,
        Method::Procedures => Request::Procedures,
    })
}

/// Encodes a request as the reference client does (`json.dumps` field order, `\r\n`).
pub fn encode_request(req: &Request, version: &str, out: &mut Vec<u8>) {
    let mut obj = serde_json::Map::new();
    let method = match req {
        Request::Task { .. } => Method::Task,
        Request::Atask { .. } => Method::Atask,
        Request::Get { .. } => Method::Get,
        Request::Signal { .. } => Method::Signal,
        Request::Id => Method::Id,
        Request::Procedures => Method::Procedures,
    };
    obj.insert("method".into(), method.name().into());
    obj.insert("version".into(), version.into());
    match req {
        Request::Task { procedure, args, extra } | Request::Atask { procedure, args, extra } => {
            obj.insert("remote_procedure".into(), procedure.clone().into());
            obj.insert("remote_procedure_args".into(), Value::Array(args.clone()));
            if let Some(e) = extra.expires_at {
                obj.insert("expires_at".into(), e.0.into());
            }
            if let Some(p) = &extra.pid {
                obj.insert("pid".into(), p.as_str().into());
            }
        }
        Request::Get { id } => {
            obj.insert("atask_id".into(), id.as_str().into());
        }
        Request::Signal { id, status } => {
            obj.insert("atask_id".into(), id.as_str().into());
            obj.insert("atask_status".into(), status.name().into());
        }
        Request::Id | Request::Procedures => {}
    }
    serde_json::to_writer(&mut *out, &Value::Object(obj)).expect("writing JSON to a Vec cannot fail");
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(line: &str) -> Code {
        match decode_request(line.as_bytes()) {
            Ok(_) => Code::Ok,
            Err(a) => a.code,
        }
    }

    #[test]
    fn decodes_every_method_in_any_case_and_version() {
        let r = decode_request(
            br#"{"method": "atask", "version": "0.3", "remote_procedure": "procs.add", "remote_procedure_args": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Atask {
                procedure: "procs.add".into(),
                args: vec![1.into(), 2.into()],
                extra: Extension::default()
            }
        );
        let r = decode_request(
            br#"{"method": "atask", "version": "1.0", "remote_procedure": "p.x", "remote_procedure_args": [], "expires_at": 1700000000000, "pid": "t-1"}"#,
        )
        .unwrap();
        let want = Extension { expires_at: Some(UnixMs(1_700_000_000_000)), pid: Some("t-1".parse().unwrap()) };
        assert!(matches!(&r, Request::Atask { extra, .. } if *extra == want), "{r:?}");
        let bad = r#"{"method": "task", "version": "1.0", "remote_procedure": "p.x", "remote_procedure_args": []"#;
        assert_eq!(code(&format!(r#"{bad}, "expires_at": "soon"}}"#)), Code::Malformed);
        assert_eq!(code(&format!(r#"{bad}, "pid": 7}}"#)), Code::UnknownTask);
        let r =
            decode_request(br#"{"method":"TASK","version":"1.0","remote_procedure":"p.x","remote_procedure_args":[]}"#);
        assert!(matches!(r, Ok(Request::Task { .. })));
        let r = decode_request(br#"{"method":"Get","version":"ARPCP/1.0","atask_id":"abc-1"}"#).unwrap();
        assert_eq!(r, Request::Get { id: "abc-1".parse().unwrap() });
        let r = decode_request(br#"{"method":"SIGNAL","version":1.0,"atask_id":"a","atask_status":"Terminate"}"#);
        assert_eq!(r.unwrap(), Request::Signal { id: "a".parse().unwrap(), status: SignalStatus::Terminate });
        assert_eq!(decode_request(br#"{"method":"id","version":"1.0"}"#).unwrap(), Request::Id);
        assert_eq!(decode_request(br#"{"version":"1.0","method":"PROCEDURES"}"#).unwrap(), Request::Procedures);
    }

    #[test]
    fn refusals_carry_the_seed_codes() {
        assert_eq!(code("not json"), Code::Malformed);
        assert_eq!(code("[1, 2]"), Code::Malformed);
        assert_eq!(code("\"atask\""), Code::Malformed);
        assert_eq!(decode_request(b"{\"method\": \"\xff\"}").unwrap_err().code, Code::Malformed);
        assert_eq!(code(r#"{"method": 5, "version": "1.0"}"#), Code::Malformed);
        assert_eq!(code(r#"{"version": "1.0"}"#), Code::MissingField);
        assert_eq!(code(r#"{"method": "atask"}"#), Code::MissingField);
        assert_eq!(code(r#"{"method": "atask", "version": "2.0"}"#), Code::Version);
        assert_eq!(code(r#"{"method": "atask", "version": true}"#), Code::Version);
        assert_eq!(code(r#"{"method": "fly", "version": "1.0"}"#), Code::UnknownMethod);
        assert_eq!(code(r#"{"method": "atask", "version": "1.0", "remote_procedure_args": []}"#), Code::MissingField);
        assert_eq!(code(r#"{"method": "task", "version": "1.0", "remote_procedure": "a.b"}"#), Code::MissingField);
        assert_eq!(
            code(r#"{"method": "task", "version": "1.0", "remote_procedure": "a.b", "remote_procedure_args": {}}"#),
            Code::BadArguments
        );
        assert_eq!(
            code(r#"{"method": "task", "version": "1.0", "remote_procedure": 7, "remote_procedure_args": []}"#),
            Code::Malformed
        );
        assert_eq!(code(r#"{"method": "get", "version": "1.0"}"#), Code::MissingField);
        assert_eq!(code(r#"{"method": "get", "version": "1.0", "atask_id": 12}"#), Code::UnknownTask);
        assert_eq!(code(r#"{"method": "signal", "version": "1.0", "atask_id": "x"}"#), Code::MissingField);
        assert_eq!(
            code(r#"{"method": "signal", "version": "1.0", "atask_id": "x", "atask_status": "explode"}"#),
            Code::Malformed
        );
        let e = decode_request(br#"{"method": "get", "version": "1.0"}"#).unwrap_err();
        assert!(e.description.contains("atask_id"), "{}", e.description);
    }

    #[test]
    fn answers_are_one_line_with_an_integer_code() {
        let mut out = Vec::new();
        Answer::ok("OK", json("{\n  \"a\": [1,\n 2]\n}").unwrap()).encode(&mut out);
        let line = String::from_utf8(out.clone()).unwrap();
        assert!(line.ends_with("\r\n") && !line.trim_end().contains('\n'), "{line:?}");
        assert!(line.starts_with(r#"{"code":100,"description":"OK","data":"#), "{line}");
        let back = Answer::decode(line.trim_end().as_bytes()).unwrap();
        assert_eq!(back.code, Code::Ok);
        assert_eq!(back.data.get(), r#"{"a":[1,2]}"#);
        out.clear();
        Answer::error(Code::ProcedureFailed, "boom\nbang").encode(&mut out);
        assert_eq!(out, b"{\"code\":400,\"description\":\"boom\\nbang\",\"data\":null}\r\n");
        assert_eq!(Answer::string_data("é\"").get(), "\"é\\\"\"");
    }

    #[test]
    fn encoded_requests_decode_back() {
        let reqs = [
            Request::Task { procedure: "p.a".into(), args: vec!["x".into(), Value::Null], extra: Extension::default() },
            Request::Atask {
                procedure: "p.b".into(),
                args: vec![],
                extra: Extension { expires_at: Some(UnixMs(5)), pid: Some("t-0".parse().unwrap()) },
            },
            Request::Get { id: "id-1".parse().unwrap() },
            Request::Signal { id: "id-2".parse().unwrap(), status: SignalStatus::ClientError },
            Request::Id,
            Request::Procedures,
        ];
        for r in reqs {
            let mut out = Vec::new();
            encode_request(&r, "1.0", &mut out);
            assert!(out.ends_with(b"\r\n"));
            assert_eq!(decode_request(&out[..out.len() - 2]).unwrap(), r);
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_refuse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(a) = decode_request(&bytes) {
                prop_assert!(a.code != Code::Ok);
                prop_assert!(!a.description.is_empty());
            }
        }

        #[test]
        fn mutated_requests_never_panic(cut in 0usize..120, byte in any::<u8>()) {
            let mut line = br#"{"method": "signal", "version": "1.0", "atask_id": "a-1", "atask_status": "done"}"#.to_vec();
            let at = cut.min(line.len() - 1);
            line[at] = byte;
            let _ = decode_request(&line);
            let _ = decode_request(&line[..at]);
        }
    }
}
