//! An app's manifest: what to run (executable, arguments, environment), parsed from JSON or TOML.
//!
//! ```toml
//! executable = "bin/worker"     # relative to the app directory; Cocaine's key `slave` works too
//! args = ["--verbose"]
//! env = { RUST_LOG = "info" }
//! [procedures]                  # events callable as tasks (`APP.EVENT`), with their parameters
//! add = ["a:number", "b:number"]  # `name` or `name:type` (null boolean number integer string array object)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The text formats a manifest or profile may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON (Cocaine's format).
    Json,
    /// TOML.
    Toml,
}

impl Format {
    /// The format a file name implies: `.toml` is TOML, anything else JSON.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Format::Toml,
            _ => Format::Json,
        }
    }
}

/// Why a manifest or profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid JSON/TOML for this document (unknown key, wrong type, ...).
    #[error("{what}: cannot parse {format:?}: {message}")]
    Parse {
        /// "manifest" or "profile".
        what: &'static str,
        /// The format tried.
        format: Format,
        /// The parser's message (names the key and position).
        message: String,
    },
    /// A value is out of range.
    #[error("{what}: `{field}` {reason}")]
    Invalid {
        /// "manifest" or "profile".
        what: &'static str,
        /// The key, as written in the file.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

pub(crate) fn parse_text<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
    format: Format,
) -> Result<T, ConfigError> {
    let parsed = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        Format::Toml => toml::from_str(text).map_err(|e| e.message().to_string()),
    };
    parsed.map_err(|message| ConfigError::Parse { what, format, message })
}

/// What to run for an app.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Path of the worker executable; a relative path is relative to the app directory.
    #[serde(alias = "slave")]
    pub executable: String,
    /// Arguments placed before the engine's own (`--app ... --protocol 1`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables added to the worker's environment.
    #[serde(default, alias = "environment")]
    pub env: BTreeMap<String, String>,
    /// Events callable as tasks (procedures `APP.EVENT`), each with its parameters in order.
    #[serde(default)]
    pub procedures: BTreeMap<String, Vec<Param>>,
}

/// The JSON type a procedure's argument must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    /// `null`.
    Null,
    /// `true` or `false`.
    Boolean,
    /// Any number.
    Number,
    /// A number without a fraction.
    Integer,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl JsonType {
    const NAMES: [(&'static str, JsonType); 7] = [
        ("null", JsonType::Null),
        ("boolean", JsonType::Boolean),
        ("number", JsonType::Number),
        ("integer", JsonType::Integer),
        ("string", JsonType::String),
        ("array", JsonType::Array),
        ("object", JsonType::Object),
    ];

    /// The type's name as written in a manifest.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, t)| *t == self).map_or("", |(n, _)| n)
    }

    /// Whether `value` has this type.
    pub fn matches(self, value: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (self, value) {
            (JsonType::Null, V::Null) | (JsonType::Boolean, V::Bool(_)) | (JsonType::Number, V::Number(_)) => true,
            (JsonType::Integer, V::Number(n)) => n.is_i64() || n.is_u64(),
            (JsonType::String, V::String(_)) | (JsonType::Array, V::Array(_)) | (JsonType::Object, V::Object(_)) => {
                true
            }
            _ => false,
        }
    }
}

/// One parameter of a procedure: `name` or `name:type` in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Param {
    /// Its name (shown in errors and listings).
    pub name: String,
    /// The JSON type its argument must have; `None` takes any value.
    pub ty: Option<JsonType>,
}

impl TryFrom<String> for Param {
    type Error = String;

    fn try_from(s: String) -> Result<Param, String> {
        let (name, ty) = match s.split_once(':') {
            Some((n, t)) => {
                let ty = JsonType::NAMES.iter().find(|(name, _)| *name == t.trim()).map(|(_, ty)| *ty).ok_or_else(
                    || format!("parameter {s:?}: unknown type; use null, boolean, number, integer, string, array or object"),
                )?;
                (n.trim(), Some(ty))
            }
            None => (s.trim(), None),
        };
        if name.is_empty() || name.len() > 64 {
            return Err(format!("parameter {s:?}: a name is 1 to 64 characters"));
        }
        Ok(Param { name: name.to_string(), ty })
    }
}

impl Manifest {
    /// A manifest that runs `executable` with no extra arguments or environment.
    pub fn new(executable: impl Into<String>) -> Self {
        Manifest { executable: executable.into(), args: Vec::new(), env: BTreeMap::new(), procedures: BTreeMap::new() }
    }

    /// Parses and validates a manifest.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad syntax, unknown keys or wrong types;
    /// [`ConfigError::Invalid`] for an empty executable or a bad argument or variable.
    pub fn parse(text: &str, format: Format) -> Result<Manifest, ConfigError> {
        let m: Manifest = parse_text("manifest", text, format)?;
        m.validate()?;
        Ok(m)
    }

    /// Checks the values.
    ///
    /// # Errors
    /// As [`Manifest::parse`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| Err(ConfigError::Invalid { what: "manifest", field, reason: reason.into() });
        if self.executable.trim().is_empty() {
            return bad("executable", "is empty; give the path of the worker program");
        }
        if self.executable.contains('\0') {
            return bad("executable", "contains a NUL byte");
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return bad("args", "contain a NUL byte");
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad("env", &format!("has an invalid variable {k:?}: names are non-empty, without `=` or NUL"));
            }
        }
        for (event, params) in &self.procedures {
            if event.is_empty() || event.len() > 128 || event.chars().any(char::is_control) {
                return bad("procedures", &format!("has an invalid event {event:?}: 1 to 128 printable characters"));
            }
            if let Some(p) = params.iter().enumerate().find(|(i, p)| params[..*i].iter().any(|q| q.name == p.name)) {
                return bad("procedures", &format!("{event}: parameter {:?} appears twice", p.1.name));
            }
        }
        Ok(())
    }

    /// The executable's path, resolved against the app directory.
    pub fn executable_path(&self, app_dir: &Path) -> std::path::PathBuf {
        app_dir.join(&self.executable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_with_cocaine_key_and_toml() {
        let m = Manifest::parse(r#"{"slave": "worker.py", "environment": {"A": "1"}}"#, Format::Json).unwrap();
        assert_eq!(m.executable, "worker.py");
        assert_eq!(m.env["A"], "1");
        let m = Manifest::parse("executable = \"bin/w\"\nargs = [\"-v\"]\n", Format::Toml).unwrap();
        assert_eq!(m.args, vec!["-v"]);
        assert_eq!(m.executable_path(Path::new("/apps/x")), Path::new("/apps/x/bin/w"));
        assert_eq!(Manifest::new("/abs").executable_path(Path::new("/apps/x")), Path::new("/abs"));
    }

    #[test]
    fn procedures_declare_parameters_and_types() {
        let m = Manifest::parse(
            r#"{"executable": "w", "procedures": {"add": ["a:number", "b: integer"], "echo": ["value"], "noop": []}}"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(m.procedures["add"][1], Param { name: "b".into(), ty: Some(JsonType::Integer) });
        assert_eq!(m.procedures["echo"], vec![Param { name: "value".into(), ty: None }]);
        assert!(m.procedures["noop"].is_empty());
        let t = Manifest::parse("executable = \"w\"\n[procedures]\nadd = [\"a:number\"]\n", Format::Toml).unwrap();
        assert_eq!(t.procedures["add"][0].ty, Some(JsonType::Number));
        assert!(
            JsonType::Integer.matches(&serde_json::json!(3)) && !JsonType::Integer.matches(&serde_json::json!(3.5))
        );
        assert!(JsonType::Object.matches(&serde_json::json!({})) && !JsonType::String.matches(&serde_json::json!(1)));
        assert_eq!(JsonType::Array.name(), "array");
        let e = Manifest::parse(r#"{"executable": "w", "procedures": {"x": ["a:float"]}}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("unknown type"), "{e}");
        let e = Manifest::parse(r#"{"executable": "w", "procedures": {"x": ["a", "a:string"]}}"#, Format::Json)
            .unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Manifest::parse(r#"{"executable": "w", "argz": []}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("argz"), "{e}");
        let e = Manifest::parse(r#"{"args": []}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("executable"), "{e}");
        let e = Manifest::parse("executable = \" \"", Format::Toml).unwrap_err();
        assert_eq!(e.to_string(), "manifest: `executable` is empty; give the path of the worker program");
        let e = Manifest::parse(r#"{"executable": "w", "env": {"A=B": "x"}}"#, Format::Json).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { field: "env", .. }), "{e}");
        let e = Manifest::parse("{", Format::Json).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { format: Format::Json, .. }));
    }
}
