//! An app's manifest: what to run (executable, arguments, environment), parsed from JSON or TOML.
//!
//! ```toml
//! executable = "bin/worker"     # relative to the app directory; Cocaine's key `slave` works too
//! args = ["--verbose"]
//! env = { RUST_LOG = "info" }
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
}

impl Manifest {
    /// A manifest that runs `executable` with no extra arguments or environment.
    pub fn new(executable: impl Into<String>) -> Self {
        Manifest { executable: executable.into(), args: Vec::new(), env: BTreeMap::new() }
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
