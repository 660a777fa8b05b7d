//! From bytes to a validated [`Config`]: YAML syntax, then shape (with field paths), then meaning.

use std::path::Path;

use super::Config;
use super::model::RawConfig;

/// Why a configuration was rejected. Every variant says where, so a user can fix the file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("invalid YAML: {0}")]
    Syntax(String),
    /// A field that is missing, unknown, of the wrong type or with an invalid value.
    #[error("{path}: {reason}")]
    Field { path: String, reason: String },
}

impl ConfigError {
    pub(crate) fn field(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<(Config, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let config = parse_yaml(&text)?;
    Ok((config, text))
}

/// Parses and validates YAML text.
///
/// YAML is first read into a generic tree, so that the typed pass can report the exact field
/// path of a shape error (`listeners[0].routes[1].backends`), which YAML parsers do not give.
pub fn parse_yaml(text: &str) -> Result<Config, ConfigError> {
    let tree: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?
    };
    let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(top level)".to_string()
        } else {
            path
        };
        ConfigError::Field {
            path,
            reason: e.into_inner().to_string(),
        }
    })?;
    Config::try_from(raw)
}
