//! Chat templates: Hugging Face's Jinja chat templates rendered with `minijinja`, set up as
//! transformers sets up Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and with the
//! helpers templates call: `raise_exception(message)`, `strftime_now(format)` (UTC), a
//! Python-compatible `tojson`, and Python's string and dict methods (`.strip()`,
//! `.startswith()`, `.get()`, `.items()`, ...).
//!
//! Messages follow the OpenAI chat format: `content` is a string, `null`, or a list of
//! `{"type": "text", "text": ...}` parts, which are joined with newlines (as vLLM does)
//! into the string the template sees. Other fields (`name`, `tool_calls`, ...) pass through.

use crate::tokenizer::TokenizerError;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat message in the OpenAI format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Any other fields (`name`, `tool_calls`, `tool_call_id`, ...), passed to the template.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    /// A message with plain text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            extra: serde_json::Map::new(),
        }
    }
}

/// A message's content: a string or a list of typed parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message; kiln's models read `{"type": "text"}` parts only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl MessageContent {
    /// The text the template sees: the string, or the text parts joined with newlines.
    pub fn to_text(&self) -> Result<String, TokenizerError> {
        match self {
            MessageContent::Text(text) => Ok(text.clone()),
            MessageContent::Parts(parts) => {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => texts.push(text.as_str()),
                        ("text", None) => {
                            return Err(TokenizerError::Message(
                                "a content part of type `text` needs a `text` field".into(),
                            ))
                        }
                        (other, _) => {
                            return Err(TokenizerError::Message(format!(
                                "content parts of type `{other}` are not supported; this model reads text only"
                            )))
                        }
                    }
                }
                Ok(texts.join("\n"))
            }
        }
    }
}

/// The variables a template is rendered with besides `messages`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Further variables (`tools`, `documents`, `enable_thinking`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at the first request.
    pub fn new(source: impl Into<String>) -> Result<ChatTemplate, TokenizerError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| TokenizerError::ChatTemplate(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TokenizerError::ChatTemplate(describe(&e)))?;
        Ok(ChatTemplate { source, env })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` with `options`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, TokenizerError> {
        let mut rendered_messages = Vec::with_capacity(messages.len());
        for message in messages {
            let mut object = serde_json::Map::new();
            object.insert("role".into(), message.role.clone().into());
            let content = match &message.content {
                Some(content) => serde_json::Value::String(content.to_text()?),
                None => serde_json::Value::Null,
            };
            object.insert("content".into(), content);
            for (key, value) in &message.extra {
                object.entry(key.clone()).or_insert_with(|| value.clone());
            }
            rendered_messages.push(serde_json::Value::Object(object));
        }
        let mut context = options.extra.clone();
        context.insert("messages".into(), rendered_messages.into());
        context.insert(
            "add_generation_prompt".into(),
            options.add_generation_prompt.into(),
        );
        for (key, value) in [
            ("bos_token", &options.bos_token),
            ("eos_token", &options.eos_token),
            ("pad_token", &options.pad_token),
            ("unk_token", &options.unk_token),
        ] {
            if let Some(value) = value {
                context.insert(key.into(), value.clone().into());
            }
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::ChatTemplate(describe(&e)))?;
        template
            .render(Value::from(minijinja::value::Serde(
                serde_json::Value::Object(context),
            )))
            .map_err(|e| TokenizerError::ChatTemplate(describe(&e)))
    }
}

/// A minijinja error with its detail and location, on one line.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time, formatted like Python's `strftime`.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, seconds)
}

/// Formats `unix_seconds` (UTC) with the common `strftime` directives: %Y %y %m %d %e %j %H
/// %I %M %S %p %A %a %B %b %F %T %%.
pub fn strftime(format: &str, unix_seconds: i64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'B' => month_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            '%' => "%".to_string(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `tojson` as transformers defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, so `", "` and `": "` separators without indent, keys in insertion order.
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a non-negative integer, got {v}"),
            )
        })?),
    };
    // Accepted for compatibility; kiln always writes non-ASCII as is and keeps key order.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot serialize: {e}"),
        )
    })?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    value: &serde_json::Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %j", t).unwrap(),
            "26 Jul 2024 13:25:09 Friday 208"
        );
        assert_eq!(strftime("%F %T %%", 0).unwrap(), "1970-01-01 00:00:00 %");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
    }

    #[test]
    fn tojson_writes_python_style() {
        let template =
            ChatTemplate::new("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}")
                .unwrap();
        let message = ChatMessage::new("user", "héllo \"x\"");
        let text = template
            .render(&[message], &RenderOptions::default())
            .unwrap();
        assert_eq!(
            text,
            "{\"role\": \"user\", \"content\": \"héllo \\\"x\\\"\"}|{\n  \"role\": \"user\",\n  \"content\": \"héllo \\\"x\\\"\"\n}"
        );
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let template = ChatTemplate::new(
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}",
        )
        .unwrap();
        let err = template
            .render(&[ChatMessage::new("user", "hi")], &RenderOptions::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("a system message must come first"),
            "{err}"
        );
    }

    #[test]
    fn python_methods_and_loop_controls_work() {
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}",
        )
        .unwrap();
        let text = template
            .render(
                &[
                    ChatMessage::new("user", "  hi  "),
                    ChatMessage::new("user", "no"),
                ],
                &RenderOptions::default(),
            )
            .unwrap();
        assert_eq!(text, "HI");
    }
}
