//! How a run's tool calls are written and read back. Two ways:
//! - **native**, where the model's chat template renders `tools`
//!   (`ToolFormat`): the built-in tools go to the template as function
//!   schemas, the model may think in free text first, and once it opens a
//!   call the call is held to the tools' grammar; one answer may hold
//!   several calls.
//! - **JSON-only**, for templates without tools: the whole answer is one
//!   `{"tool": …}` object held to a grammar.
//!
//! A live run and a replayed journal read answers with the same function
//! (`read`), so a resumed run sees the calls the live one acted on.

use serde_json::{json, Value};

use crate::engine::tool_format::{json as j, ToolFormat};
use crate::engine::FinishReason;
use crate::engine::Format;

use super::mcp::{self, Tool};
use super::tools::ToolCall;

/// A path argument: what the workspace takes, kept short.
const PATH: &str = r#"[A-Za-z0-9_.][A-Za-z0-9_./ -]{0,200}"#;

/// One shape a built-in call may take: the tool and its string fields,
/// each a path or any text.
struct Shape {
    tool: &'static str,
    fields: &'static [(&'static str, Body)],
}

#[derive(Clone, Copy)]
enum Body {
    Path,
    Text,
    /// A list of paths.
    Paths,
}

impl Body {
    /// The field's JSON value as a regular expression.
    fn pattern(self) -> String {
        match self {
            Body::Path => format!(r#""{PATH}""#),
            Body::Text => j::string(),
            Body::Paths => format!(r#"\[(?:"{PATH}"(?:, "{PATH}")*)?\]"#),
        }
    }
}

const SHAPES: &[Shape] = &[
    Shape {
        tool: "list_dir",
        fields: &[("path", Body::Path)],
    },
    Shape {
        tool: "read_file",
        fields: &[("path", Body::Path)],
    },
    Shape {
        tool: "search",
        fields: &[("query", Body::Text)],
    },
    Shape {
        tool: "write_file",
        fields: &[("path", Body::Path), ("content", Body::Text)],
    },
    Shape {
        tool: "write_file",
        fields: &[
            ("path", Body::Path),
            ("find", Body::Text),
            ("replace", Body::Text),
        ],
    },
    Shape {
        tool: "shell",
        fields: &[("command", Body::Text)],
    },
    Shape {
        tool: "shell",
        fields: &[("command", Body::Text), ("edits", Body::Paths)],
    },
    Shape {
        tool: "finish",
        fields: &[("summary", Body::Text)],
    },
];

impl Shape {
    /// The call's arguments as a regular expression of their JSON object,
    /// after `head` (the JSON-only call's `"tool": …` field).
    fn object(&self, head: Option<String>) -> String {
        let fields = self
            .fields
            .iter()
            .map(|(k, b)| format!(r#""{k}": {}"#, b.pattern()));
        let all: Vec<String> = head.into_iter().chain(fields).collect();
        format!(r"\{{{}\}}", all.join(", "))
    }
}

/// How deep an MCP tool's arguments may nest in the call grammar: its
/// schema is the server's, so the grammar holds the call to JSON.
const MCP_DEPTH: u32 = 3;

/// The grammar of a JSON-only tool call, as one regular expression: the
/// built-in tools, and `{"tool": "mcp", …}` for the MCP tools offered.
pub fn tool_call_pattern(offered: &[&Tool]) -> String {
    let builtin = SHAPES.iter().map(|s| {
        s.object(Some(format!(
            r#""tool": "{}""#,
            regex_syntax::escape(s.tool)
        )))
    });
    let servers = offered.iter().map(|t| {
        format!(
            r#"\{{"tool": "mcp", "name": "{}", "arguments": {}\}}"#,
            regex_syntax::escape(&t.name),
            j::object(MCP_DEPTH)
        )
    });
    builtin.chain(servers).collect::<Vec<_>>().join("|")
}

/// The JSON-only system prompt's lines for the MCP tools offered.
pub fn json_prompt_lines(offered: &[&Tool]) -> String {
    offered
        .iter()
        .map(|t| {
            let call = serde_json::json!({"tool": "mcp", "name": t.name, "arguments": {}});
            format!("\n{call} with arguments as {}: {}", t.schema, t.description)
        })
        .collect()
}

/// What constrained decoding holds a run's answers to: free text with
/// calls held to the tools' grammar, or, when `forced` (the last answer
/// called nothing), calls from the first token, as `tool_choice`
/// "required" does.
pub fn format(native: Option<ToolFormat>, forced: bool, offered: &[&Tool]) -> Format {
    let Some(f) = native else {
        return Format::Whole(tool_call_pattern(offered));
    };
    let calls: Vec<String> = SHAPES
        .iter()
        .map(|s| f.call_json(s.tool, &s.object(None)))
        .chain(
            offered
                .iter()
                .map(|t| f.call_json(&t.name, &j::object(MCP_DEPTH))),
        )
        .collect();
    match forced {
        true => Format::Whole(f.forced(&calls)),
        false => Format::Calls {
            trigger: f.trigger().to_string(),
            pattern: f.after_trigger(&calls),
        },
    }
}

/// The tools as a chat template lists them, OpenAI-style function
/// schemas: the built-in ones, then the MCP tools offered.
pub fn schemas(offered: &[&Tool]) -> Vec<Value> {
    builtin_schemas()
        .into_iter()
        .chain(offered.iter().map(|t| t.function()))
        .collect()
}

fn builtin_schemas() -> Vec<Value> {
    let path = json!({"type": "string", "description": "A path relative to the folder."});
    let text = |d: &str| json!({"type": "string", "description": d});
    let function = |name: &str, description: &str, properties: Value, required: &[&str]| {
        json!({
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {"type": "object", "properties": properties, "required": required},
            }
        })
    };
    vec![
        function("list_dir", "List a folder's entries.", json!({"path": path}), &["path"]),
        function("read_file", "Read a text file.", json!({"path": path}), &["path"]),
        function(
            "search",
            "Find the lines of the folder's files that contain a text.",
            json!({"query": text("The text to find.")}),
            &["query"],
        ),
        function(
            "write_file",
            "Write a file: give `content` for the whole new file, or `find` and `replace` to replace the one place `find` occurs.",
            json!({
                "path": path,
                "content": text("The whole new file."),
                "find": text("Text that occurs exactly once in the file."),
                "replace": text("What replaces it."),
            }),
            &["path"],
        ),
        function(
            "shell",
            "Run a shell command in the folder; its output comes back. Name the files it will change in `edits` to get back what it changed in them, as a diff.",
            json!({
                "command": text("The command line."),
                "edits": {"type": "array", "items": path, "description": "Files the command will change."},
            }),
            &["command"],
        ),
        function(
            "finish",
            "End the run when the task is done.",
            json!({"summary": text("What you did.")}),
            &["summary"],
        ),
    ]
}

/// An answer read for its calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// What the model wrote before and between its calls (native only).
    pub text: String,
    /// The calls in order, each with its id in the template's terms
    /// (native only).
    pub calls: Vec<(Option<String>, ToolCall)>,
}

/// The calls in `reply`, or what to tell the model when there are none it
/// can act on. `finish` says how the answer ended, so a call cut by the
/// token limit is said as such.
pub fn read(
    native: Option<ToolFormat>,
    reply: &str,
    finish: FinishReason,
) -> Result<Answer, String> {
    let cut = finish == FinishReason::MaxTokens;
    let Some(format) = native else {
        return match serde_json::from_str::<ToolCall>(reply.trim()) {
            Ok(call) => Ok(Answer {
                text: String::new(),
                calls: vec![(None, call)],
            }),
            Err(e) if cut => Err(format!(
                "the call was cut at the answer's token limit ({e})"
            )),
            Err(e) => Err(e.to_string()),
        };
    };
    let parsed = format.parse(reply);
    if let Some(problem) = parsed.problem {
        return Err(match cut {
            true => format!("{problem}: the answer reached its token limit; write shorter calls (a patch rather than a whole file)"),
            false => problem,
        });
    }
    if parsed.calls.is_empty() {
        return Err("the answer called no tool".into());
    }
    let calls = parsed
        .calls
        .into_iter()
        .map(|c| Ok((Some(c.id), from_native(&c.name, &c.arguments)?)))
        .collect::<Result<_, String>>()?;
    Ok(Answer {
        text: parsed.text,
        calls,
    })
}

/// A call the model wrote in its own format, as kiln's call: an MCP
/// tool's by its server's prefix (whether the server offers it is asked
/// when it runs).
fn from_native(name: &str, arguments: &Value) -> Result<ToolCall, String> {
    let shown = crate::visible::visible_line(name);
    if name.contains(mcp::SEPARATOR) {
        if !arguments.is_object() {
            return Err(format!("{shown}'s arguments are not an object"));
        }
        return Ok(ToolCall::Mcp {
            name: name.to_string(),
            arguments: arguments.clone(),
        });
    }
    let mut object = arguments
        .as_object()
        .cloned()
        .ok_or_else(|| format!("{shown}'s arguments are not an object"))?;
    if object.contains_key("tool") {
        return Err(format!("{shown} takes no argument named \"tool\""));
    }
    object.insert("tool".into(), Value::String(name.to_string()));
    serde_json::from_value(Value::Object(object)).map_err(|e| format!("{shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_reads_back_as_the_call_its_grammar_allows() {
        let re = regex::Regex::new(&format!("^(?:{})$", tool_call_pattern(&[]))).unwrap();
        assert!(re.is_match(r#"{"tool": "read_file", "path": "notes.txt"}"#));
        assert!(re.is_match(r#"{"tool": "write_file", "path": "a", "find": "x", "replace": "y"}"#));
        assert!(!re.is_match(r#"{"tool": "rm", "path": "a"}"#));
        let native = Some(ToolFormat::Hermes);
        let reply = "First a look.\n<tool_call>\n{\"name\": \"list_dir\", \"arguments\": {\"path\": \".\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"finish\", \"arguments\": {\"summary\": \"done\"}}\n</tool_call>";
        let a = read(native, reply, FinishReason::Stop).unwrap();
        assert_eq!(a.text, "First a look.");
        assert_eq!(a.calls[0].1, ToolCall::ListDir { path: ".".into() });
        assert_eq!(
            a.calls[1].1,
            ToolCall::Finish {
                summary: "done".into()
            }
        );
        assert!(a
            .calls
            .iter()
            .all(|(id, _)| id.as_ref().is_some_and(|i| i.len() == 9)));
        let Format::Whole(forced) = format(native, true, &[]) else {
            panic!("a forced answer is calls from its start");
        };
        let forced = regex::Regex::new(&format!("^(?:{forced})$")).unwrap();
        let one = reply
            .split_once('\n')
            .unwrap()
            .1
            .split_inclusive("</tool_call>")
            .next()
            .unwrap();
        assert!(forced.is_match(one), "{one}");
        let Format::Calls { pattern, trigger } = format(native, false, &[]) else {
            panic!("native runs hold calls, not answers");
        };
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        let body = reply
            .split(&trigger)
            .nth(1)
            .unwrap()
            .split("</tool_call>")
            .next()
            .unwrap();
        assert!(re.is_match(&format!("{body}</tool_call>")), "{body}");
    }

    #[test]
    fn answers_without_a_call_to_act_on_say_why() {
        let native = Some(ToolFormat::Hermes);
        let none = read(native, "I think the task is done.", FinishReason::Stop).unwrap_err();
        assert!(none.contains("no tool"), "{none}");
        let cut = read(native, "<tool_call>\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"a\", \"content\": \"lo", FinishReason::MaxTokens).unwrap_err();
        assert!(cut.contains("token limit"), "{cut}");
        let unknown = read(
            native,
            "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
            FinishReason::Stop,
        )
        .unwrap_err();
        assert!(unknown.contains("rm_rf"), "{unknown}");
        let smuggled = read(native, "<tool_call>\n{\"name\": \"finish\", \"arguments\": {\"tool\": \"shell\", \"summary\": \"x\"}}\n</tool_call>", FinishReason::Stop).unwrap_err();
        assert!(smuggled.contains("\"tool\""), "{smuggled}");
        let json_cut = read(
            None,
            "{\"tool\": \"shell\", \"command\": \"ec",
            FinishReason::MaxTokens,
        )
        .unwrap_err();
        assert!(json_cut.contains("token limit"), "{json_cut}");
    }

    /// An MCP tool is called by its prefixed name in either way of
    /// writing calls, held to JSON arguments, and reads back as an MCP
    /// call; the template lists it after the built-in tools.
    #[test]
    fn an_mcp_tool_is_offered_and_read_back_in_both_modes() {
        let tool = Tool {
            name: "fs__read_text_file".into(),
            tool: "read_text_file".into(),
            server: "fs".into(),
            description: "Read a file.".into(),
            schema: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            read_only: true,
        };
        let offered = [&tool];
        let call = ToolCall::Mcp {
            name: "fs__read_text_file".into(),
            arguments: json!({"path": "/w/a.txt"}),
        };
        let json_call =
            r#"{"tool": "mcp", "name": "fs__read_text_file", "arguments": {"path": "/w/a.txt"}}"#;
        let Format::Whole(pattern) = format(None, false, &offered) else {
            panic!("JSON-only answers are held whole");
        };
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(re.is_match(json_call));
        assert!(!re.is_match(&json_call.replace("fs__read_text_file", "fs__write_file")));
        assert_eq!(
            read(None, json_call, FinishReason::Stop).unwrap().calls[0].1,
            call
        );
        let native = Some(ToolFormat::Hermes);
        let Format::Calls { pattern, .. } = format(native, false, &offered) else {
            panic!("native answers hold calls");
        };
        let body = "\n{\"name\": \"fs__read_text_file\", \"arguments\": {\"path\": \"/w/a.txt\"}}\n</tool_call>";
        assert!(regex::Regex::new(&format!("^(?:{pattern})$"))
            .unwrap()
            .is_match(body));
        let reply = format!("<tool_call>{body}");
        assert_eq!(
            read(native, &reply, FinishReason::Stop).unwrap().calls[0].1,
            call
        );
        let listed = schemas(&offered);
        assert_eq!(
            listed.last().unwrap()["function"]["name"],
            "fs__read_text_file"
        );
        assert!(json_prompt_lines(&offered).contains("fs__read_text_file"));
    }

    #[test]
    fn the_schemas_name_every_tool_the_grammar_allows() {
        let names: Vec<String> = schemas(&[])
            .iter()
            .map(|s| s["function"]["name"].as_str().unwrap().to_string())
            .collect();
        for shape in SHAPES {
            assert!(names.iter().any(|n| n == shape.tool), "{}", shape.tool);
        }
    }
}
