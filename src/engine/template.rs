//! Renders a conversation with the model's own chat template (the jinja
//! template in the GGUF's `tokenizer.chat_template`), configured the way
//! Hugging Face transformers renders it. A file without one gets llama.cpp's
//! built-in template for its family, or ChatML.

use std::ffi::CString;

use minijinja::value::{Kwargs, Value};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::context::{Message, Role};
use super::thinking;
use super::tool_format::ToolFormat;

/// ChatML, for GGUF files that carry no template and whose family llama.cpp
/// has no built-in for.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Where a conversation's template comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source<'a> {
    /// The file's own jinja template.
    File(&'a str),
    /// One of `llama_chat_apply_template`'s built-ins, by llama.cpp's name.
    Builtin(&'static str),
    /// Neither: ChatML.
    ChatMl,
}

pub use crate::gguf::builtin_for;

#[derive(Clone)]
enum Kind {
    Jinja(Environment<'static>),
    Builtin(&'static str),
}

#[derive(Clone)]
pub struct ChatTemplate {
    kind: Kind,
    /// What the status bar says when the template is not the file's own.
    fallback: Option<String>,
    bos: String,
    eos: String,
    /// `enable_thinking` for templates that take it; `None` leaves the
    /// template's default.
    thinking: Option<bool>,
    /// Whether the template takes a system message; where it does not
    /// (Gemma's raises), the system prompt opens the first user message.
    system_role: bool,
    /// The format it renders `tools` and tool calls in, if any.
    tool_format: Option<ToolFormat>,
}

impl ChatTemplate {
    pub fn new(source: Source<'_>, bos: Option<&str>, eos: &str) -> Result<Self, String> {
        let tool_format = match source {
            Source::File(text) => ToolFormat::detect(text),
            _ => None,
        };
        let (kind, fallback) = match source {
            Source::File(text) => (Kind::Jinja(environment(text)?), None),
            Source::ChatMl => (
                Kind::Jinja(environment(CHATML)?),
                Some("ChatML template (the file has none)".to_string()),
            ),
            Source::Builtin(name) => (
                Kind::Builtin(name),
                Some(format!("llama.cpp's {name} template (the file has none)")),
            ),
        };
        let mut t = ChatTemplate {
            kind,
            fallback,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.to_string(),
            thinking: None,
            system_role: true,
            tool_format,
        };
        let probe = "\u{1}kiln";
        t.system_role = t
            .render_strict(
                &[
                    Message::new(Role::System, probe),
                    Message::new(Role::User, "?"),
                ],
                &[],
                true,
            )
            .is_ok_and(|text| text.contains(probe));
        Ok(t)
    }

    /// The template a model file asks for: its own, else the fallback.
    pub fn for_file(info: &crate::gguf::GgufInfo, thinking: Option<bool>) -> Result<Self, String> {
        let source = match (&info.chat_template, info.builtin_template) {
            (Some(t), _) => Source::File(t),
            (None, Some(name)) => Source::Builtin(name),
            (None, None) => Source::ChatMl,
        };
        Ok(
            ChatTemplate::new(source, info.bos_token.as_deref(), &info.eos_token)?
                .with_thinking(thinking),
        )
    }

    /// Pass `enable_thinking` to the template (`None`: its default).
    pub fn with_thinking(mut self, thinking: Option<bool>) -> Self {
        self.thinking = thinking;
        self
    }

    /// The status bar's notes on how this template renders: a fallback in
    /// use, thinking switched on or off.
    pub fn notes(&self) -> Vec<String> {
        let thinking = self.thinking.map(|on| match on {
            true => "thinking on".to_string(),
            false => "thinking off".to_string(),
        });
        self.fallback.iter().cloned().chain(thinking).collect()
    }

    /// The tool-call format the template renders, if it renders tools.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        self.tool_format
    }

    pub fn eos(&self) -> &str {
        &self.eos
    }

    /// What is used in place of the file's own template, if anything.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Render with `tools`, OpenAI-style function schemas, for templates
    /// that list them (Qwen's `<tools>`, Llama 3.1's JSON functions).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        match messages.split_first() {
            Some((system, rest)) if system.role == Role::System && !self.system_role => {
                let mut merged: Vec<Message> = rest.to_vec();
                match merged.iter_mut().find(|m| m.role == Role::User) {
                    Some(user) => user.content = format!("{}\n\n{}", system.content, user.content),
                    None => merged.insert(0, Message::new(Role::User, system.content.clone())),
                }
                self.render_strict(&merged, tools, add_generation_prompt)
            }
            _ => self.render_strict(messages, tools, add_generation_prompt),
        }
    }

    /// Render exactly these messages; a template's exception is an error.
    fn render_strict(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        match &self.kind {
            Kind::Jinja(env) => {
                let messages: Vec<Value> = messages.iter().map(jinja_message).collect();
                let template = env.get_template("chat").map_err(|e| e.to_string())?;
                let tools = match tools.is_empty() {
                    true => Value::from(()),
                    false => Value::from_serialize(tools),
                };
                let ctx = context! {
                    messages,
                    tools,
                    add_generation_prompt,
                    bos_token => self.bos,
                    eos_token => self.eos,
                };
                let ctx = match self.thinking {
                    Some(on) => context! { enable_thinking => on, ..ctx },
                    None => ctx,
                };
                template
                    .render(ctx)
                    .map_err(|e| format!("cannot render the chat template: {}", error_text(&e)))
            }
            Kind::Builtin(name) => apply_builtin(name, messages, add_generation_prompt),
        }
    }
}

/// An assistant message goes to the template as its answer, with any
/// thinking as `reasoning_content` and its calls as OpenAI-style
/// `tool_calls`, the way transformers passes them: the template decides
/// what the model sees again. A tool result carries its call's id.
fn jinja_message(m: &Message) -> Value {
    let role = m.role.as_str();
    let base = match (m.role, &m.tool_call_id) {
        (Role::Tool, Some(id)) => context! { role, content => m.content, tool_call_id => id },
        (Role::Assistant, _) => {
            let split = thinking::split(&m.content);
            match split.thinking {
                Some(thinking) => context! {
                    role,
                    content => split.answer.trim_start_matches('\n'),
                    reasoning_content => thinking.trim_matches('\n'),
                },
                None => context! { role, content => m.content },
            }
        }
        _ => context! { role, content => m.content },
    };
    if m.tool_calls.is_empty() {
        return base;
    }
    let calls: Vec<Value> = m
        .tool_calls
        .iter()
        .map(|c| {
            Value::from_serialize(serde_json::json!({
                "id": c.id,
                "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            }))
        })
        .collect();
    context! { tool_calls => calls, ..base }
}

/// A template error with its cause: minijinja puts a `raise_exception`
/// message in the source chain.
fn error_text(e: &Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

fn environment(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> Result<String, Error> {
        strftime(&format, time::OffsetDateTime::now_utc())
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", source.to_string())
        .map_err(|e| format!("cannot compile the chat template: {e}"))?;
    Ok(env)
}

/// Python's `json.dumps` as transformers' `tojson` calls it: `", "` and
/// `": "` between items, non-ASCII kept, no HTML escaping, keys in order
/// unless `sort_keys`. Models were trained on exactly these bytes.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    if sort_keys == Some(true) {
        sort(&mut json);
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n.min(64)];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, f))
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonCompact,
        )),
    };
    written.map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    Ok(Value::from_safe_string(String::from_utf8(out).map_err(
        |e| Error::new(ErrorKind::BadSerialization, e.to_string()),
    )?))
}

fn sort(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort),
        _ => {}
    }
}

/// `json.dumps`'s default separators.
struct PythonCompact;

/// The separator before every item but the first.
fn comma<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    match first {
        true => Ok(()),
        false => w.write_all(b", "),
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma(w, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Python's `strftime` for the directives chat templates use (dates for
/// "Today Date:" lines), in UTC.
fn strftime(format: &str, at: time::OffsetDateTime) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month = at.month().to_string();
        let weekday = at.weekday().to_string();
        match chars.next() {
            Some('Y') => out.push_str(&at.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", at.year().rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", u8::from(at.month()))),
            Some('d') => out.push_str(&format!("{:02}", at.day())),
            Some('e') => out.push_str(&format!("{:>2}", at.day())),
            Some('j') => out.push_str(&format!("{:03}", at.ordinal())),
            Some('H') => out.push_str(&format!("{:02}", at.hour())),
            Some('M') => out.push_str(&format!("{:02}", at.minute())),
            Some('S') => out.push_str(&format!("{:02}", at.second())),
            Some('B') => out.push_str(&month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(&weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('%') => out.push('%'),
            other => {
                return Err(format!(
                    "strftime_now: %{} is not supported",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        }
    }
    Ok(out)
}

/// Render with one of llama.cpp's built-in templates (no model needed).
fn apply_builtin(
    name: &str,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String, String> {
    let nul = |_| "a message contains a NUL byte".to_string();
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|m| {
            let content = match m.role {
                Role::Assistant => thinking::split(&m.content).shown_answer(),
                _ => &m.content,
            };
            // The built-ins know no tool role; a result reads as the user's.
            let role = match m.role {
                Role::Tool => Role::User,
                r => r,
            };
            Ok((
                CString::new(role.as_str()).map_err(nul)?,
                CString::new(content).map_err(nul)?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let chat: Vec<llama_cpp_sys_2::llama_chat_message> = owned
        .iter()
        .map(|(role, content)| llama_cpp_sys_2::llama_chat_message {
            role: role.as_ptr(),
            content: content.as_ptr(),
        })
        .collect();
    let tmpl = CString::new(name).map_err(nul)?;
    let total: usize = messages.iter().map(|m| m.content.len() + 16).sum();
    let mut buf = vec![0u8; (total * 2).max(256)];
    for _ in 0..2 {
        let len =
            i32::try_from(buf.len()).map_err(|_| "the conversation is too long".to_string())?;
        // SAFETY: every pointer in `chat` points into `owned`, alive for the
        // call; llama.cpp writes at most `len` bytes into `buf`.
        let n = unsafe {
            llama_cpp_sys_2::llama_chat_apply_template(
                tmpl.as_ptr(),
                chat.as_ptr(),
                chat.len(),
                add_generation_prompt,
                buf.as_mut_ptr().cast(),
                len,
            )
        };
        let n = usize::try_from(n)
            .map_err(|_| format!("llama.cpp's {name} template cannot render this conversation"))?;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf).map_err(|e| e.to_string());
        }
        buf = vec![0u8; n];
    }
    Err(format!(
        "llama.cpp's {name} template did not settle on a length"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ChatTemplate {
        ChatTemplate::new(Source::File(text), None, "</s>").unwrap()
    }

    #[test]
    fn chatml_fallback_renders_and_extends() {
        let t = ChatTemplate::new(Source::ChatMl, None, "<|im_end|>").unwrap();
        assert!(t.fallback().unwrap().contains("ChatML"));
        let one = vec![Message::new(Role::User, "hi")];
        let a = t.render(&one, true).unwrap();
        assert_eq!(a, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let mut two = one.clone();
        two.push(Message::new(Role::Assistant, "hello"));
        two.push(Message::new(Role::User, "again"));
        let b = t.render(&two, true).unwrap();
        // The KV reuse relies on a rendered prompt plus the reply and the
        // end-of-turn token being a prefix of the next rendered prompt.
        assert!(b.starts_with(&format!("{a}hello<|im_end|>")));
    }

    #[test]
    fn template_exceptions_are_errors_with_their_message() {
        let t = file("{{ raise_exception('no such role') }}");
        assert!(t.render(&[], true).unwrap_err().contains("no such role"));
    }

    #[test]
    fn python_string_methods_work() {
        let t = file("{{ messages[0]['content'].strip() }}");
        assert_eq!(
            t.render(&[Message::new(Role::User, "  x ")], false)
                .unwrap(),
            "x"
        );
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = file(
            "{{ {'b': 1, 'a': [1, 'é<&>'], 'c': {}} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ [1, {'k': none}] | tojson(indent=2) }}",
        );
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"b\": 1, \"a\": [1, \"é<&>\"], \"c\": {}}|{\"a\": 2, \"b\": 1}|[\n  1,\n  {\n    \"k\": null\n  }\n]"
        );
        assert!(file("{{ 1 | tojson(bogus=1) }}")
            .render(&[], false)
            .is_err());
    }

    #[test]
    fn strftime_covers_the_directives_templates_use() {
        let at = time::macros::datetime!(2026-03-05 07:08:09 UTC);
        assert_eq!(strftime("%d %b %Y", at).unwrap(), "05 Mar 2026");
        assert_eq!(strftime("%B %d, %Y", at).unwrap(), "March 05, 2026");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %%", at).unwrap(),
            "2026-03-05 07:08:09 Thu %"
        );
        assert!(strftime("%Q", at).unwrap_err().contains("%Q"));
        assert!(strftime("%", at).is_err());
    }

    #[test]
    fn builtins_are_chosen_by_vocabulary() {
        let vocab = |tokens: &'static [&'static str]| move |t: &str| tokens.contains(&t);
        assert_eq!(
            builtin_for(vocab(&["<start_of_turn>", "<end_of_turn>"])),
            Some("gemma")
        );
        assert_eq!(
            builtin_for(vocab(&["<|im_start|>", "<|im_end|>"])),
            Some("chatml")
        );
        assert_eq!(
            builtin_for(vocab(&["<|im_start|>", "<|im_sep|>"])),
            Some("phi4")
        );
        assert_eq!(
            builtin_for(vocab(&["[INST]", "[/INST]"])),
            Some("mistral-v3")
        );
        assert_eq!(builtin_for(vocab(&["<s>", "</s>"])), None);
    }

    #[test]
    fn a_builtin_renders_through_llama_cpp() {
        let t = ChatTemplate::new(Source::Builtin("gemma"), Some("<bos>"), "<eos>").unwrap();
        assert!(t.fallback().unwrap().contains("gemma"));
        let text = t
            .render(
                &[
                    Message::new(Role::System, "Be brief."),
                    Message::new(Role::User, "Hi"),
                    Message::new(Role::Assistant, "<think>hm</think>Hello."),
                    Message::new(Role::User, "Again"),
                ],
                true,
            )
            .unwrap();
        assert!(
            text.contains("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>"),
            "{text}"
        );
        assert!(
            text.contains("<start_of_turn>model\nHello.<end_of_turn>"),
            "{text}"
        );
        assert!(!text.contains("hm"), "thinking is not sent back: {text}");
        assert!(text.ends_with("<start_of_turn>model\n"), "{text}");
        let nul = t
            .render(&[Message::new(Role::User, "a\0b")], true)
            .unwrap_err();
        assert!(nul.contains("NUL"), "{nul}");
    }
}
