//! Renders a conversation with the model's own chat template (the jinja
//! template in the GGUF's `tokenizer.chat_template`), configured the way
//! Hugging Face transformers renders it.

use minijinja::{context, Environment, ErrorKind};

use super::context::Message;

/// ChatML, for GGUF files that carry no template of their own.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos: Option<&str>, eos: &str) -> Result<Self, String> {
        let source = source.unwrap_or(CHATML).to_string();
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| format!("cannot compile the chat template: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.to_string(),
        })
    }

    pub fn eos(&self) -> &str {
        &self.eos
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages,
                add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| format!("cannot render the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Role;

    #[test]
    fn chatml_fallback_renders_and_extends() {
        let t = ChatTemplate::new(None, None, "<|im_end|>").unwrap();
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
    fn template_exceptions_are_errors() {
        let t = ChatTemplate::new(
            Some("{{ raise_exception('no system role') }}"),
            None,
            "</s>",
        )
        .unwrap();
        assert!(t.render(&[], true).unwrap_err().contains("no system role"));
    }

    #[test]
    fn python_string_methods_work() {
        let t =
            ChatTemplate::new(Some("{{ messages[0]['content'].strip() }}"), None, "</s>").unwrap();
        assert_eq!(
            t.render(&[Message::new(Role::User, "  x ")], false)
                .unwrap(),
            "x"
        );
    }
}
