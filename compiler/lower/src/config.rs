//! Reading `config { ... }` fields from a Hugging Face config.json: JSON paths with
//! alternatives, defaults, and type checks that name the key and what was found.

use crate::value::ConfigValue;
use serde_json::Value as Json;

/// The declared type of a config field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    Int,
    Float,
    Bool,
    Str,
}

impl ConfigType {
    pub fn from_name(name: &str) -> Option<ConfigType> {
        match name {
            "int" | "i32" | "i64" => Some(ConfigType::Int),
            "float" | "f32" | "f64" => Some(ConfigType::Float),
            "bool" => Some(ConfigType::Bool),
            "str" | "string" => Some(ConfigType::Str),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConfigType::Int => "int",
            ConfigType::Float => "float",
            ConfigType::Bool => "bool",
            ConfigType::Str => "str",
        }
    }

    /// Converts a JSON value to this type; `Err` describes what was found instead.
    pub fn from_json(self, json: &Json) -> Result<ConfigValue, String> {
        let found = || format!("found {}", describe_json(json));
        match self {
            ConfigType::Int => json
                .as_i64()
                .map(ConfigValue::Int)
                .ok_or_else(|| format!("expected an integer, {}", found())),
            ConfigType::Float => json
                .as_f64()
                .map(ConfigValue::Float)
                .ok_or_else(|| format!("expected a number, {}", found())),
            ConfigType::Bool => json
                .as_bool()
                .map(ConfigValue::Bool)
                .ok_or_else(|| format!("expected true or false, {}", found())),
            ConfigType::Str => json
                .as_str()
                .map(|s| ConfigValue::Str(s.to_string()))
                .ok_or_else(|| format!("expected a string, {}", found())),
        }
    }

    /// Converts a compile-time value (a default) to this type; ints widen to floats.
    pub fn coerce(self, value: ConfigValue) -> Option<ConfigValue> {
        match (self, value) {
            (ConfigType::Int, v @ ConfigValue::Int(_)) => Some(v),
            (ConfigType::Float, ConfigValue::Int(i)) => Some(ConfigValue::Float(i as f64)),
            (ConfigType::Float, v @ ConfigValue::Float(_)) => Some(v),
            (ConfigType::Bool, v @ ConfigValue::Bool(_)) => Some(v),
            (ConfigType::Str, v @ ConfigValue::Str(_)) => Some(v),
            _ => None,
        }
    }
}

fn describe_json(json: &Json) -> String {
    match json {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("{b}"),
        Json::Number(n) => format!("{n}"),
        Json::String(s) => format!("{s:?}"),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

/// Looks up a field: `paths` is `a.b|c` (alternatives separated by `|`, nested keys by `.`);
/// the first alternative present and not null wins. Returns the path that matched.
pub fn lookup<'j>(config: &'j Json, paths: &str) -> Option<(&'j Json, String)> {
    for path in paths.split('|') {
        let path = path.trim();
        let mut node = config;
        let mut found = true;
        for key in path.split('.') {
            match node.get(key) {
                Some(next) => node = next,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if found && !node.is_null() {
            return Some((node, path.to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn alternatives_take_the_first_present_non_null_path() {
        let cfg = json!({"rope_scaling": null, "rope_parameters": {"factor": 8.0}});
        let (v, path) = lookup(&cfg, "rope_scaling.factor|rope_parameters.factor").unwrap();
        assert_eq!(v, &json!(8.0));
        assert_eq!(path, "rope_parameters.factor");
        assert!(lookup(&cfg, "rope_scaling.factor").is_none());
    }

    #[test]
    fn type_errors_say_what_was_found() {
        let err = ConfigType::Int.from_json(&json!("4096")).unwrap_err();
        assert_eq!(err, "expected an integer, found \"4096\"");
        assert_eq!(
            ConfigType::Float.from_json(&json!(3)).unwrap(),
            ConfigValue::Float(3.0)
        );
    }
}
