//! The config file (`--config PATH`, `SONDE_CONFIG`): one YAML document with the
//! pipeline's settings, read with serde-saphyr. Every section is optional and no file at
//! all is the same as an empty one.
//!
//! ```yaml
//! selection: { exclude_comm: [...], cgroups: [...], exclude: [...] }   # crate::selection
//! identity: [ { match: {...}, service_name: ..., attributes: {...} } ] # crate::selection
//! business: { defaults: true, rules: [...] }                           # crate::business
//! sampling: { ratio: 0.1, slow: 10s, hold: 35s, limit: 2000 }          # crate::sampling
//! redaction: { enabled: true, names: [...], headers: [...] }           # crate::business::redact
//! kubernetes: { enabled: auto, source: apiserver, refresh_interval: 60s } # crate::kubernetes
//! ```
//!
//! Unknown keys, wrong types and bad rules are errors that name the file, the line and
//! the column; the file is read before anything is loaded into the kernel.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    business::{BusinessConfig, RedactionConfig},
    sampling::SamplingConfig,
    selection::{IdentityRule, SelectionConfig},
};

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub selection: SelectionConfig,
    #[serde(default)]
    pub identity: Vec<IdentityRule>,
    #[serde(default)]
    pub business: BusinessConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub kubernetes: crate::kubernetes::KubernetesConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The parser's message names the line and column and shows them.
    #[error("config file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Settings {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| SettingsError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the text of a config file; the error names the line and column.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        let settings = serde_saphyr::from_str::<Option<Settings>>(text)
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string())?;
        settings.sampling.check()?;
        Ok(settings)
    }

    /// The file at `path`, or the defaults without one.
    pub fn load_optional(path: Option<&Path>) -> Result<Self, SettingsError> {
        path.map_or_else(|| Ok(Settings::default()), Self::load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sonde.example.yaml");
        let s = Settings::load(&path).unwrap();
        assert!(!s.business.rules.is_empty());
        assert!(!s.identity.is_empty());
        assert!(!s.selection.exclude.is_empty());
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        for text in ["", "\n# nothing\n", "{}"] {
            let s = Settings::parse(text).unwrap();
            assert!(
                s.business.defaults && s.business.rules.is_empty(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_line_column_and_problem() {
        let cases = [
            (
                "business:\n  rules:\n    - json: order.id\n      atribute: x\n",
                "line 4",
                "unknown field `atribute`",
            ),
            (
                "selection:\n  exclude_comm: sshd\n",
                "line 2",
                "exclude_comm",
            ),
            ("business:\n  defaults: maybe\n", "line 2", "bool"),
            (
                "business:\n  rules:\n  - path: /orders/{id}\n    query: id\n",
                "line 3",
                "exactly one of",
            ),
            (
                "business:\n  rules:\n  - json: 'a[x]'\n",
                "line 3",
                "inside []",
            ),
            ("business: [\n", "line", ""),
            ("colour: red\n", "line 1", "unknown field `colour`"),
        ];
        for (text, line, what) in cases {
            let err = Settings::parse(text).unwrap_err();
            assert!(err.contains(line) && err.contains(what), "{text:?}: {err}");
        }
    }
}
