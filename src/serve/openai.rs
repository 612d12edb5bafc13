//! OpenAI's chat and completion requests as kiln runs them: parsed with
//! every count and size bounded, then turned into a conversation (system
//! prompt, history, the new input), the tools its template lists, the
//! sampler's settings, stop strings, and the format constrained decoding
//! holds the answer to (`tools`/`tool_choice`, `response_format`).

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::chat::ToolCallMessage;
use crate::engine::tool_format::{self, json, ToolFormat};
use crate::engine::{Format, Message, ModelInfo, Role, SamplerSettings};

pub const MAX_MESSAGES: usize = 4096;
pub const MAX_TOOLS: usize = 128;
pub const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;
/// OpenAI's own limit on a function's name.
const MAX_NAME: usize = 64;
/// A schema's regular expression, beyond which the grammar would be too
/// big to build per turn.
const MAX_PATTERN: usize = 64 << 10;
/// How deep arguments nest when a tool's schema cannot be held to exactly.
const ARGUMENT_DEPTH: u32 = 3;
/// Between a schema's JSON tokens: at most one space, as models write JSON.
const SCHEMA_SPACE: &str = "[ ]?";

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub tools: Option<Vec<InTool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Who the client says it is, shown beside its address.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub n: Option<u32>,
    /// llama.cpp's server and vLLM pass these to the template; kiln reads
    /// `enable_thinking`.
    #[serde(default)]
    pub chat_template_kwargs: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both APIs share, with llama.cpp's server's
/// extensions (`top_k`, `min_p`, `repeat_penalty`).
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct InFunctionCall {
    pub name: String,
    /// A JSON object as a string, as OpenAI sends it.
    #[serde(default)]
    pub arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: InFunction,
}

#[derive(Debug, Deserialize)]
pub struct InFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchema {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
}

/// A chat request as the engine takes it.
#[derive(Debug)]
pub struct ChatPlan {
    pub system: Option<String>,
    /// The messages before the input, which the KV cache's prefix reuse
    /// matches against what the conversation held.
    pub history: Vec<Message>,
    /// The user message or tool results that the answer answers.
    pub input: Vec<Message>,
    /// OpenAI-style function schemas for the template.
    pub tools: Vec<Value>,
    /// The answer's calls are read back in this format.
    pub calls: Option<ToolFormat>,
    /// The answer is calls from its first token (`tool_choice` required or
    /// a named function), which for Mistral come without their opening
    /// control token.
    pub forced: bool,
    pub format: Option<Format>,
    pub sampler: SamplerSettings,
    pub stops: Vec<String>,
}

/// `model` names the loaded model: its id, its file's name, or nothing.
pub fn check_model(model: Option<&str>, info: &ModelInfo) -> Result<(), ApiError> {
    let Some(wanted) = model.filter(|m| !m.is_empty()) else {
        return Ok(());
    };
    let file = info.path.as_deref();
    let names = [
        Some(info.name.as_str()),
        file.and_then(|p| p.file_name()).and_then(|n| n.to_str()),
        file.and_then(|p| p.file_stem()).and_then(|n| n.to_str()),
    ];
    match names.into_iter().flatten().any(|n| n == wanted) {
        true => Ok(()),
        false => Err(ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!(
                "the model '{}' is not served here; this node serves '{}' (GET /v1/models)",
                shorten(wanted),
                info.name
            ),
            param: Some("model"),
        }),
    }
}

/// A client's text as it may be quoted back: one line, bounded.
pub fn shorten(text: &str) -> String {
    let line = crate::visible::visible_line(text);
    match line.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.into_owned(),
    }
}

impl Sampling {
    /// `base` (the node's settings) with the request's fields over it; the
    /// answer's length at most `context` tokens.
    pub fn settings(
        &self,
        base: &SamplerSettings,
        context: usize,
    ) -> Result<SamplerSettings, ApiError> {
        let mut s = base.clone();
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(p) = self.min_p {
            s.min_p = p;
        }
        if let Some(p) = self.repeat_penalty {
            s.repeat_penalty = p;
        }
        if let Some(p) = self.frequency_penalty {
            s.frequency_penalty = p;
        }
        if let Some(p) = self.presence_penalty {
            s.presence_penalty = p;
        }
        // A negative seed is llama.cpp's "pick one".
        if let Some(seed) = self.seed {
            s.seed = u64::try_from(seed).ok();
        }
        if let Some(n) = self.max_completion_tokens.or(self.max_tokens) {
            if n == 0 || n as usize > context {
                return Err(ApiError::field(
                    "max_tokens",
                    format!("max_tokens must be 1 to {context} (the context window)"),
                ));
            }
            s.max_tokens = n;
        }
        s.validate().map_err(ApiError::bad)?;
        Ok(s)
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::field(
                "stop",
                format!("at most {MAX_STOPS} stop strings"),
            ));
        }
        if stops
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::field(
                "stop",
                format!("a stop string must be 1 to {MAX_STOP_BYTES} bytes"),
            ));
        }
        Ok(stops)
    }
}

/// Only one choice per request.
pub fn check_n(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(_) => Err(ApiError::field("n", "kiln serve gives one choice (n = 1)")),
    }
}

impl Content {
    fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(ApiError::field(
                        "messages",
                        format!(
                            "a content part of type '{}': this node takes text only",
                            shorten(kind)
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|parts| parts.join("")),
        }
    }
}

impl ChatRequest {
    pub fn plan(&self, info: &ModelInfo, base: &SamplerSettings) -> Result<ChatPlan, ApiError> {
        check_model(self.model.as_deref(), info)?;
        check_n(self.n)?;
        let mut sampler = self.sampling.settings(base, info.context_limit)?;
        if let Some(on) = self
            .chat_template_kwargs
            .as_ref()
            .and_then(|k| k.get("enable_thinking"))
            .and_then(Value::as_bool)
        {
            sampler.thinking = Some(on);
        }
        let stops = self.sampling.stops()?;
        let (system, mut messages) = self.messages()?;
        // The answer answers what came after the last answer.
        let from = messages
            .iter()
            .rposition(|m| m.role == Role::Assistant)
            .map_or(0, |i| i + 1);
        let input = messages.split_off(from);
        if input.is_empty() {
            return Err(ApiError::field(
                "messages",
                "the last message must be the user's or a tool's: there is nothing to answer",
            ));
        }
        let (tools, calls, mut format) = self.tools(info)?;
        let forced = calls.is_some() && matches!(format, Some(Format::Whole(_)));
        if let Some(response) = self.response_format()? {
            if format.is_some() {
                return Err(ApiError::field(
                    "response_format",
                    "response_format with tool_choice required: pick one",
                ));
            }
            format = Some(response);
        }
        Ok(ChatPlan {
            system,
            history: messages,
            input,
            tools,
            calls,
            forced,
            format,
            sampler,
            stops,
        })
    }

    /// The system prompt (the first message's, where it is the system's)
    /// and the conversation.
    fn messages(&self) -> Result<(Option<String>, Vec<Message>), ApiError> {
        if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES {
            return Err(ApiError::field(
                "messages",
                format!("1 to {MAX_MESSAGES} messages"),
            ));
        }
        let mut system = None;
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                Some(c) => c.text()?,
                None => String::new(),
            };
            let role = match m.role.as_str() {
                "system" | "developer" if i == 0 => {
                    system = Some(content);
                    continue;
                }
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::field(
                        "messages",
                        format!("message {i} has the role '{}'", shorten(other)),
                    ))
                }
            };
            let mut message = Message::new(role, content);
            if role == Role::Tool {
                message.tool_call_id = m.tool_call_id.as_deref().map(tool_format::template_id);
            }
            for (n, call) in m.tool_calls.iter().flatten().enumerate() {
                let arguments = match call.function.arguments.as_deref() {
                    None | Some("") => Value::Object(Default::default()),
                    Some(text) => serde_json::from_str(text).map_err(|e| {
                        ApiError::field(
                            "messages",
                            format!("message {i}'s call {n} has arguments that are not JSON: {e}"),
                        )
                    })?,
                };
                message.tool_calls.push(ToolCallMessage {
                    id: match &call.id {
                        Some(id) => tool_format::template_id(id),
                        None => tool_format::call_id(n, &call.function.name, &arguments),
                    },
                    name: call.function.name.clone(),
                    arguments,
                });
            }
            out.push(message);
        }
        Ok((system, out))
    }

    /// The tools for the template, the format their calls come back in,
    /// and what `tool_choice` holds the answer to.
    #[allow(clippy::type_complexity)]
    fn tools(
        &self,
        info: &ModelInfo,
    ) -> Result<(Vec<Value>, Option<ToolFormat>, Option<Format>), ApiError> {
        let offered = self.tools.as_deref().unwrap_or_default();
        let choice = Choice::read(self.tool_choice.as_ref())?;
        if offered.is_empty() || choice == Choice::None {
            return match choice {
                Choice::Required | Choice::Named(_) => Err(ApiError::field(
                    "tool_choice",
                    "tool_choice asks for a call, but no tools were given",
                )),
                _ => Ok((Vec::new(), None, None)),
            };
        }
        if offered.len() > MAX_TOOLS {
            return Err(ApiError::field(
                "tools",
                format!("at most {MAX_TOOLS} tools"),
            ));
        }
        let Some(native) = info.tool_format else {
            return Err(ApiError::field(
                "tools",
                format!(
                    "{}'s chat template has no tool-call format kiln can read; run it with a template that lists tools (Qwen2.5, Hermes, Llama 3.1, Mistral)",
                    info.name
                ),
            ));
        };
        let mut schemas = Vec::with_capacity(offered.len());
        let mut calls = Vec::with_capacity(offered.len());
        for tool in offered {
            let f = &tool.function;
            if tool.kind != "function" {
                return Err(ApiError::field(
                    "tools",
                    format!("a tool of type '{}': only functions", shorten(&tool.kind)),
                ));
            }
            let good_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if f.name.is_empty() || f.name.len() > MAX_NAME || !f.name.chars().all(good_name) {
                return Err(ApiError::field(
                    "tools",
                    format!(
                        "the tool name '{}': 1 to {MAX_NAME} letters, digits, _ or -",
                        shorten(&f.name)
                    ),
                ));
            }
            if let Choice::Named(name) = &choice {
                if name != &f.name {
                    continue;
                }
            }
            let parameters = f
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
            calls.push(native.call_json(&f.name, &arguments_pattern(&parameters)));
            let mut function = serde_json::json!({"name": f.name, "parameters": parameters});
            if let Some(d) = &f.description {
                function["description"] = d.clone().into();
            }
            schemas.push(serde_json::json!({"type": "function", "function": function}));
        }
        if let Choice::Named(name) = &choice {
            if calls.is_empty() {
                return Err(ApiError::field(
                    "tool_choice",
                    format!(
                        "tool_choice names '{}', which is not in tools",
                        shorten(name)
                    ),
                ));
            }
        }
        let format = match choice {
            Choice::Required | Choice::Named(_) => Format::Whole(native.forced(&calls)),
            _ => Format::Calls {
                trigger: native.trigger().to_string(),
                pattern: native.after_trigger(&calls),
            },
        };
        Ok((schemas, Some(native), Some(format)))
    }

    fn response_format(&self) -> Result<Option<Format>, ApiError> {
        match &self.response_format {
            None | Some(ResponseFormat::Text) => Ok(None),
            Some(ResponseFormat::JsonObject) => {
                Ok(Some(Format::Whole(json::object(ARGUMENT_DEPTH + 1))))
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let schema = json_schema.schema.as_ref().ok_or_else(|| {
                    ApiError::field("response_format", "json_schema without a schema")
                })?;
                schema_pattern(schema).map(|p| Some(Format::Whole(p)))
            }
        }
    }
}

/// A JSON Schema as the regular expression of the JSON it allows.
pub fn schema_pattern(schema: &Value) -> Result<String, ApiError> {
    let pattern = outlines_core::json_schema::regex_from_value(schema, Some(SCHEMA_SPACE), Some(4))
        .map_err(|e| {
            ApiError::field(
                "response_format",
                format!("the JSON schema cannot be held to: {e}"),
            )
        })?;
    match pattern.len() <= MAX_PATTERN {
        true => Ok(pattern),
        false => Err(ApiError::field(
            "response_format",
            "the JSON schema is too large to hold an answer to",
        )),
    }
}

/// The pattern of a call's arguments: its schema's where that can be held
/// to, else any JSON object (the client validates).
fn arguments_pattern(parameters: &Value) -> String {
    schema_pattern(parameters).unwrap_or_else(|_| json::object(ARGUMENT_DEPTH))
}

/// `tool_choice`: "none", "auto", "required", or one function by name.
#[derive(Debug, PartialEq)]
enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

impl Choice {
    fn read(value: Option<&Value>) -> Result<Choice, ApiError> {
        let named = |v: &Value| {
            v.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|n| Choice::Named(n.to_string()))
        };
        match value {
            None | Some(Value::Null) => Ok(Choice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => Ok(Choice::None),
                "auto" => Ok(Choice::Auto),
                "required" => Ok(Choice::Required),
                other => Err(ApiError::field(
                    "tool_choice",
                    format!("tool_choice '{}': none, auto, required or a function", shorten(other)),
                )),
            },
            Some(v) => named(v).ok_or_else(|| {
                ApiError::field(
                    "tool_choice",
                    "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": …}}",
                )
            }),
        }
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<String, ApiError> {
        match &self.prompt {
            Prompt::One(p) => Ok(p.clone()),
            Prompt::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            Prompt::Many(_) => Err(ApiError::field("prompt", "one prompt per request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(format: Option<ToolFormat>) -> ModelInfo {
        ModelInfo {
            name: "smollm2".into(),
            engine: "llamacpp".into(),
            architecture: "llama".into(),
            path: Some("/m/SmolLM2-135M.Q4_1.gguf".into()),
            context_limit: 2048,
            notes: Vec::new(),
            tool_format: format,
        }
    }

    fn plan(body: Value, format: Option<ToolFormat>) -> Result<ChatPlan, ApiError> {
        let req: ChatRequest = serde_json::from_value(body).unwrap();
        req.plan(&info(format), &SamplerSettings::default())
    }

    #[test]
    fn the_conversation_splits_at_the_last_answer() {
        let p = plan(
            json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
            ], "temperature": 0, "seed": 7, "max_tokens": 9, "stop": "END"}),
            None,
        )
        .unwrap();
        assert_eq!(p.system.as_deref(), Some("Be brief."));
        assert_eq!(p.history.len(), 2);
        assert_eq!(p.history[1].tool_calls[0].arguments, json!({"a": 1}));
        // A client's id of another shape reaches the template as nine
        // characters, the same for the call and for its result.
        let id = tool_format::template_id("c1");
        assert_eq!(id.len(), 9);
        assert_eq!(p.history[1].tool_calls[0].id, id);
        assert_eq!(p.input, vec![Message::tool(&id, "42")]);
        assert_eq!(tool_format::template_id("abcDEF123"), "abcDEF123");
        assert_eq!(
            (p.sampler.temperature, p.sampler.seed, p.sampler.max_tokens),
            (0.0, Some(7), 9)
        );
        assert_eq!(p.stops, ["END"]);
        assert_eq!(p.format, None);
    }

    /// Each kind of bad request is refused with the field at fault.
    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "wizard", "content": "a"}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 100000}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "n": 2}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "model": "gpt-4o"}),
                "model",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
                "tools",
            ),
        ];
        for (body, field) in cases {
            let e = plan(body.clone(), Some(ToolFormat::Hermes)).unwrap_err();
            assert_eq!(e.param, Some(field), "{body}: {e:?}");
        }
        let e = plan(
            json!({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("no tool-call format"), "{e:?}");
    }

    #[test]
    fn the_model_is_named_by_id_or_file() {
        for name in [
            None,
            Some(""),
            Some("smollm2"),
            Some("SmolLM2-135M.Q4_1.gguf"),
            Some("SmolLM2-135M.Q4_1"),
        ] {
            assert!(check_model(name, &info(None)).is_ok(), "{name:?}");
        }
        let e = check_model(Some("gpt-4o\x1b[2J"), &info(None)).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::NOT_FOUND);
        assert!(!e.message.contains('\x1b'));
    }

    /// Tools go to the template as given; `auto` holds calls once one
    /// opens, `required` and a named function from the first token.
    #[test]
    fn tool_choice_picks_the_format() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "other"}}]);
        let body = |choice: Value| json!({"messages": [{"role": "user", "content": "Paris?"}], "tools": tools, "tool_choice": choice});
        let auto = plan(body(json!("auto")), Some(ToolFormat::Hermes)).unwrap();
        assert_eq!(auto.tools.len(), 2);
        assert_eq!(auto.calls, Some(ToolFormat::Hermes));
        let Some(Format::Calls { trigger, pattern }) = auto.format else {
            panic!("{:?}", auto.format)
        };
        assert_eq!(trigger, "<tool_call>");
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(re.is_match(
            "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        ));
        // The schema holds the arguments: `city` is required.
        assert!(!re.is_match("\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"));
        let named = plan(
            body(json!({"type": "function", "function": {"name": "other"}})),
            Some(ToolFormat::Hermes),
        )
        .unwrap();
        let Some(Format::Whole(pattern)) = named.format else {
            panic!()
        };
        assert!(pattern.contains("other") && !pattern.contains("get_weather"));
        let none = plan(body(json!("none")), Some(ToolFormat::Hermes)).unwrap();
        assert!(none.tools.is_empty() && none.format.is_none());
    }

    #[test]
    fn a_json_schema_becomes_the_answers_pattern() {
        let p = plan(
            json!({"messages": [{"role": "user", "content": "A colour?"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema":
                {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}, "why": {"type": "string"}},
                 "required": ["colour", "why"]}}}}),
            None,
        )
        .unwrap();
        let Some(Format::Whole(pattern)) = p.format else {
            panic!()
        };
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(re.is_match(r#"{"colour": "red", "why": "warm"}"#));
        assert!(!re.is_match(r#"{"colour": "green", "why": "warm"}"#));
        let bad = plan(
            json!({"messages": [{"role": "user", "content": "a"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "c"}}}),
            None,
        )
        .unwrap_err();
        assert_eq!(bad.param, Some("response_format"));
    }
}
