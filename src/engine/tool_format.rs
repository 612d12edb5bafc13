//! The tool-call formats instruct models are trained on, as their chat
//! templates render them: which one a template speaks, the text that opens
//! a call (after which decoding is held to the call's grammar), and how a
//! reply's calls are read back. One place for every engine and front end
//! that offers a model tools.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chat::ToolCallMessage;

/// Bytes of one call's JSON read back at most; a longer one is cut.
const MAX_CALL: usize = 256 << 10;
/// Calls read from one reply at most.
pub const MAX_CALLS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`: Qwen2.5,
    /// Qwen3 and the Hermes models.
    Hermes,
    /// A bare `{"name": …, "parameters": …}`, one per answer: Llama 3.1+.
    Llama3,
    /// `[TOOL_CALLS] [{"name": …, "arguments": …}, …]`: Mistral.
    Mistral,
}

/// A reply read for its calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// What the model wrote around its calls (its reasoning), trimmed.
    pub text: String,
    pub calls: Vec<ToolCallMessage>,
    /// A call that was opened and could not be read: cut by the token
    /// limit, or not JSON. Said to the model as it is.
    pub problem: Option<String>,
}

impl ToolFormat {
    /// The format a chat template renders `tools` in, if it renders them.
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if !template.contains("tools") {
            return None;
        }
        if template.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("\"parameters\": dictionary of argument name") {
            Some(ToolFormat::Llama3)
        } else {
            None
        }
    }

    /// What the status bar calls it.
    pub fn describe(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "native <tool_call>",
            ToolFormat::Llama3 => "native Llama 3 JSON",
            ToolFormat::Mistral => "native [TOOL_CALLS]",
        }
    }

    /// Whether one answer may hold several calls.
    pub fn several(self) -> bool {
        !matches!(self, ToolFormat::Llama3)
    }

    /// The text that opens a call in a reply.
    pub fn trigger(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Llama3 => "{\"name\": \"",
            ToolFormat::Mistral => "[TOOL_CALLS]",
        }
    }

    /// The grammar of what follows the trigger, as a regular expression:
    /// one call (for Mistral, the array of them) and what closes it.
    /// `calls` are the calls the tools allow, each `call_json`'s pattern.
    pub fn after_trigger(self, calls: &[String]) -> String {
        let any = format!("(?:{})", calls.join("|"));
        match self {
            ToolFormat::Hermes => format!(r"\n{any}\n</tool_call>"),
            // The trigger holds the call's opening; the rest follows it.
            ToolFormat::Llama3 => {
                let rests: Vec<String> = calls
                    .iter()
                    .filter_map(|c| c.strip_prefix(LLAMA3_OPEN))
                    .map(str::to_string)
                    .collect();
                format!("(?:{})", rests.join("|"))
            }
            // Unbounded: a counted repeat would copy the DFA's states per
            // count. `parse` reads `MAX_CALLS` at most.
            ToolFormat::Mistral => format!(r" ?\[{any}(?:, {any})*\]"),
        }
    }

    /// The grammar of an answer that is calls from its first token (the
    /// model answered without one when it had to call): the trigger and
    /// what follows it. Mistral's trigger is a control token, which
    /// constrained text cannot write; its calls are read without it.
    pub fn forced(self, calls: &[String]) -> String {
        match self {
            ToolFormat::Mistral => self.after_trigger(calls),
            _ => format!(
                "{}{}",
                regex_syntax::escape(self.trigger()),
                self.after_trigger(calls)
            ),
        }
    }

    /// One call's JSON as this format writes it, `name` with arguments
    /// matching `arguments` (a regular expression of a JSON object).
    pub fn call_json(self, name: &str, arguments: &str) -> String {
        let name = regex_syntax::escape(name);
        match self {
            ToolFormat::Llama3 => {
                format!(r#"{LLAMA3_OPEN}{name}", "parameters": {arguments}\}}"#)
            }
            _ => format!(r#"\{{"name": "{name}", "arguments": {arguments}\}}"#),
        }
    }

    /// The calls in a reply, and the text around them.
    pub fn parse(self, reply: &str) -> Parsed {
        match self {
            ToolFormat::Hermes => parse_tagged(reply),
            ToolFormat::Llama3 => parse_bare(reply),
            ToolFormat::Mistral => parse_array(reply),
        }
    }
}

/// The trigger of Llama 3's calls, escaped, as `call_json` starts them.
const LLAMA3_OPEN: &str = r#"\{"name": ""#;

/// A call's id: nine letters and digits (Mistral's templates insist), the
/// same for the same call wherever it is read, so an engine recording the
/// answer and an agent acting on it agree.
pub fn call_id(index: usize, name: &str, arguments: &Value) -> String {
    let mut h = Sha256::new();
    h.update(index.to_le_bytes());
    h.update(name.as_bytes());
    h.update(arguments.to_string().as_bytes());
    hex::encode(h.finalize())[..9].to_string()
}

/// A call's id as the chat template gets it: an id of nine letters and
/// digits as it is, any other (a client's `call_…`, another server's
/// thirty-two characters) as nine characters of its hash. Mistral's
/// templates refuse any other shape; the same id always maps the same way,
/// so a call and its result still pair up and a resent history renders as
/// before (its prefix stays in the KV cache).
pub fn template_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_string();
    }
    hex::encode(Sha256::digest(id.as_bytes()))[..9].to_string()
}

/// The id of call `index` of the answer `answer` (a served response's
/// id): unique to it, where `call_id` is the same for the same call in two
/// answers, and in the shape `template_id` keeps.
pub fn answer_call_id(answer: &str, index: usize) -> String {
    let mut h = Sha256::new();
    h.update(answer.as_bytes());
    h.update(index.to_le_bytes());
    hex::encode(h.finalize())[..9].to_string()
}

/// A call's JSON object read into a call: its name and its arguments (an
/// object, or a string holding one, as some models write them).
fn call_of(index: usize, object: &Value, arguments_key: &str) -> Result<ToolCallMessage, String> {
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a call without a \"name\"")?;
    let arguments = match object
        .get(arguments_key)
        .or_else(|| object.get("arguments"))
    {
        None => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("{name}'s arguments are not a JSON object: {e}"))?,
        Some(v) => v.clone(),
    };
    if !arguments.is_object() {
        return Err(format!("{name}'s arguments are not a JSON object"));
    }
    Ok(ToolCallMessage {
        id: call_id(index, name, &arguments),
        name: name.to_string(),
        arguments,
    })
}

/// The JSON value at the start of `text` (after spaces), and the bytes it
/// took; an error when it is cut or is no JSON.
fn leading_json(text: &str) -> Result<(Value, usize), String> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match stream.next() {
        Some(Ok(v)) => Ok((v, stream.byte_offset())),
        Some(Err(e)) if e.is_eof() => Err("the call was cut before it ended".into()),
        Some(Err(e)) => Err(format!("the call is not valid JSON ({e})")),
        None => Err("the call was cut before it ended".into()),
    }
}

fn join_text(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn parse_tagged(reply: &str) -> Parsed {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut parsed = Parsed::default();
    let mut text = Vec::new();
    let mut rest = reply;
    while let Some(at) = rest.find(OPEN) {
        text.push(&rest[..at]);
        let body = &rest[at + OPEN.len()..];
        let Some(end) = body.find(CLOSE) else {
            parsed.problem = Some(match leading_json(body.get(..MAX_CALL).unwrap_or(body)) {
                Ok(_) => format!("a call was not closed with {CLOSE}"),
                Err(e) => e,
            });
            rest = "";
            break;
        };
        rest = &body[end + CLOSE.len()..];
        if parsed.calls.len() == MAX_CALLS {
            parsed.problem = Some(format!("more than {MAX_CALLS} calls in one answer"));
            break;
        }
        let read = serde_json::from_str::<Value>(body[..end].trim())
            .map_err(|e| format!("the call is not valid JSON ({e})"))
            .and_then(|v| call_of(parsed.calls.len(), &v, "arguments"));
        match read {
            Ok(call) => parsed.calls.push(call),
            Err(e) => {
                parsed.problem = Some(e);
                break;
            }
        }
    }
    text.push(rest);
    parsed.text = join_text(&text);
    parsed
}

fn parse_bare(reply: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let body = reply.trim_start().trim_start_matches("<|python_tag|>");
    let Some(at) = find_object_with_name(body) else {
        parsed.text = reply.trim().to_string();
        return parsed;
    };
    match leading_json(&body[at..]) {
        Ok((v, len)) => match call_of(0, &v, "parameters") {
            Ok(call) => {
                parsed.calls.push(call);
                parsed.text = join_text(&[&body[..at], &body[at + len..]]);
            }
            Err(e) => {
                parsed.problem = Some(e);
                parsed.text = body[..at].trim().to_string();
            }
        },
        Err(e) => {
            parsed.problem = Some(e);
            parsed.text = body[..at].trim().to_string();
        }
    }
    parsed
}

/// Where a JSON object that starts with a `"name"` key begins.
fn find_object_with_name(text: &str) -> Option<usize> {
    text.match_indices('{').map(|(i, _)| i).find(|&i| {
        text[i + 1..]
            .trim_start()
            .strip_prefix("\"name\"")
            .is_some_and(|r| r.trim_start().starts_with(':'))
    })
}

fn parse_array(reply: &str) -> Parsed {
    const OPEN: &str = "[TOOL_CALLS]";
    let mut parsed = Parsed::default();
    // The trigger is a control token, which streamed text may leave out.
    let at = match reply.find(OPEN) {
        Some(at) => Some((at, at + OPEN.len())),
        None => reply.trim_start().starts_with("[{").then(|| {
            let at = reply.len() - reply.trim_start().len();
            (at, at)
        }),
    };
    let Some((before, from)) = at else {
        parsed.text = reply.trim().to_string();
        return parsed;
    };
    let head = &reply[..before];
    match leading_json(&reply[from..]) {
        Ok((Value::Array(items), len)) => {
            for (i, item) in items.iter().take(MAX_CALLS).enumerate() {
                match call_of(i, item, "arguments") {
                    Ok(call) => parsed.calls.push(call),
                    Err(e) => {
                        parsed.problem = Some(e);
                        break;
                    }
                }
            }
            if items.len() > MAX_CALLS {
                parsed.problem = Some(format!("more than {MAX_CALLS} calls in one answer"));
            }
            parsed.text = join_text(&[head, &reply[from + len..]]);
        }
        Ok(_) => {
            parsed.problem = Some(format!("{OPEN} was not followed by a list of calls"));
            parsed.text = head.trim().to_string();
        }
        Err(e) => {
            parsed.problem = Some(e);
            parsed.text = head.trim().to_string();
        }
    }
    parsed
}

/// Regular expressions of JSON for call grammars.
pub mod json {
    /// A JSON string's body: no raw quotes, backslashes or control
    /// characters.
    const STRING_BODY: &str = r#"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])*"#;

    pub fn string() -> String {
        format!(r#""{STRING_BODY}""#)
    }

    /// Any JSON value nested at most `depth` arrays or objects deep, in
    /// the spacing models write (`", "` and `": "`). Repeats are unbounded
    /// (a counted one copies the DFA's states per count); the answer's
    /// token limit bounds them.
    pub fn value(depth: u32) -> String {
        let scalar = format!(
            r"{}|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null",
            string()
        );
        if depth == 0 {
            return format!("(?:{scalar})");
        }
        let inner = value(depth - 1);
        let array = format!(r"\[(?:{inner}(?:, {inner})*)?\]");
        let object = format!(
            r#"\{{(?:{s}: {inner}(?:, {s}: {inner})*)?\}}"#,
            s = string()
        );
        format!("(?:{scalar}|{array}|{object})")
    }

    /// Any JSON object nested at most `depth` deep.
    pub fn object(depth: u32) -> String {
        let inner = value(depth.saturating_sub(1));
        format!(
            r#"\{{(?:{s}: {inner}(?:, {s}: {inner})*)?\}}"#,
            s = string()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hermes_reads_reasoning_and_several_calls() {
        let reply = "I should look first.\n<tool_call>\n{\"name\": \"list_dir\", \"arguments\": {\"path\": \".\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": \"{\\\"path\\\": \\\"a.txt\\\"}\"}\n</tool_call>";
        let p = ToolFormat::Hermes.parse(reply);
        assert_eq!(p.text, "I should look first.");
        assert_eq!(p.problem, None);
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[0].name, "list_dir");
        assert_eq!(p.calls[1].arguments, json!({"path": "a.txt"}));
        assert_eq!(p.calls[0].id.len(), 9);
        assert_ne!(p.calls[0].id, p.calls[1].id);
        assert_eq!(ToolFormat::Hermes.parse(reply), p, "ids are stable");
    }

    #[test]
    fn a_cut_or_broken_call_is_a_problem_and_keeps_the_text() {
        let cut = ToolFormat::Hermes.parse("Let me write.\n<tool_call>\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"a\", \"content\": \"lo");
        assert!(cut.problem.as_deref().unwrap().contains("cut"), "{cut:?}");
        assert_eq!(cut.text, "Let me write.");
        assert!(cut.calls.is_empty());
        let bad = ToolFormat::Hermes.parse("<tool_call>\n{name: 1}\n</tool_call>");
        assert!(bad.problem.unwrap().contains("not valid JSON"));
        let unnamed = ToolFormat::Mistral.parse("[TOOL_CALLS] [{\"arguments\": {}}]");
        assert!(unnamed.problem.unwrap().contains("name"));
        let none = ToolFormat::Hermes.parse("All done, nothing to call.");
        assert_eq!(
            (none.text.as_str(), none.calls.len(), none.problem),
            ("All done, nothing to call.", 0, None)
        );
    }

    #[test]
    fn llama3_and_mistral_read_back() {
        let l = ToolFormat::Llama3
            .parse("{\"name\": \"shell\", \"parameters\": {\"command\": \"ls\"}}");
        assert_eq!(l.calls[0].name, "shell");
        assert_eq!(l.calls[0].arguments, json!({"command": "ls"}));
        let tagged =
            ToolFormat::Llama3.parse("<|python_tag|>{\"name\": \"shell\", \"parameters\": {}}");
        assert_eq!(tagged.calls.len(), 1);
        let m = ToolFormat::Mistral.parse("[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"x\": 1}}]");
        assert_eq!(
            m.calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // Streamed without its control token.
        let bare = ToolFormat::Mistral.parse("[{\"name\": \"a\", \"arguments\": {}}]");
        assert_eq!(bare.calls.len(), 1);
        assert!(ToolFormat::Mistral
            .parse("[TOOL_CALLS] {\"name\": 1}")
            .problem
            .is_some());
    }

    /// The grammars are compiled to a dense DFA for every constrained
    /// turn: a generic three-deep object (an MCP tool's arguments) must
    /// stay small enough to build.
    #[test]
    fn call_grammars_compile_to_a_dfa() {
        let started = std::time::Instant::now();
        for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
            let calls = [
                format.call_json("read_file", r#"\{"path": "[a-z.]+"\}"#),
                format.call_json("fs__list", &json::object(3)),
            ];
            kalosm_language_model::kalosm_sample::RegexParser::new(&format.after_trigger(&calls))
                .unwrap();
        }
        eprintln!("three formats' DFAs built in {:?}", started.elapsed());
    }

    #[test]
    fn the_call_grammar_matches_what_the_model_is_to_write() {
        for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
            let calls = [
                format.call_json("read_file", r#"\{"path": "[a-z.]+"\}"#),
                format.call_json("fs.list", &json::object(3)),
            ];
            let re = regex::Regex::new(&format!("^(?:{})$", format.after_trigger(&calls))).unwrap();
            let (one, two) = match format {
                ToolFormat::Hermes => (
                    "\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}\n</tool_call>".to_string(),
                    "\n{\"name\": \"fs.list\", \"arguments\": {\"dir\": [1, {\"k\": null}]}}\n</tool_call>".to_string(),
                ),
                ToolFormat::Llama3 => (
                    "read_file\", \"parameters\": {\"path\": \"a.txt\"}}".to_string(),
                    "fs.list\", \"parameters\": {}}".to_string(),
                ),
                ToolFormat::Mistral => (
                    " [{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}]".to_string(),
                    " [{\"name\": \"fs.list\", \"arguments\": {}}, {\"name\": \"read_file\", \"arguments\": {\"path\": \"b\"}}]".to_string(),
                ),
            };
            assert!(re.is_match(&one), "{format:?} {one}");
            assert!(re.is_match(&two), "{format:?} {two}");
            assert!(
                !re.is_match(&one.replace("read_file", "rm_rf")),
                "{format:?}"
            );
            // What matches reads back as the same call.
            let parsed = format.parse(&format!("{}{one}", format.trigger()));
            assert_eq!(parsed.calls[0].name, "read_file", "{format:?}");
            assert_eq!(parsed.calls[0].arguments, json!({"path": "a.txt"}));
        }
    }
}
