//! The official `openai` Python client against a live server: models, completions and chat,
//! streamed and not, logprobs, usage chunks, and the client's typed errors (404, 400, 401).
//!
//! The client comes from `.tools/pyenv` (`pip install --target .tools/pyenv openai`) or the
//! system Python. Without it the test prints a `NOT RUN` line and passes, never silently.

mod common;

use std::process::Command;

use common::{config_for, repo, tiny_chat_model, TestServer};

const CLIENT_SCRIPT: &str = r#"
import os, sys
import openai

base = os.environ["KILN_BASE_URL"]
client = openai.OpenAI(base_url=base, api_key="test-key", max_retries=0)

models = client.models.list()
assert [m.id for m in models.data] == ["tiny-chat"], models

done = client.completions.create(model="tiny-chat", prompt="abc", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
assert done.object == "text_completion", done
assert done.choices[0].finish_reason == "length", done
assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 5, done.usage

streamed = client.completions.create(model="tiny-chat", prompt="abc", max_tokens=5,
                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
text = "".join(chunk.choices[0].text for chunk in streamed)
assert text == done.choices[0].text, (text, done.choices[0].text)

chat = client.chat.completions.create(
    model="tiny-chat",
    messages=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
    extra_body={"ignore_eos": True})
assert chat.choices[0].message.role == "assistant"
assert len(chat.choices[0].logprobs.content) == 4, chat
assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)

pieces, usage, roles = [], None, []
for chunk in client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        pieces.append(choice.delta.content or "")
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
assert roles == ["assistant"], roles
assert usage is not None and usage.completion_tokens == 4, usage

two = client.completions.create(model="tiny-chat", prompt="x", n=2, max_tokens=3, seed=9,
                                temperature=1.0, extra_body={"ignore_eos": True})
assert sorted(c.index for c in two.choices) == [0, 1], two

def expect(error_type, **kwargs):
    try:
        client.chat.completions.create(**kwargs)
    except error_type as error:
        assert error.body and "message" in error.body, error.body
        return
    raise AssertionError(f"expected {error_type.__name__}")

expect(openai.NotFoundError, model="no-such-model", messages=[{"role": "user", "content": "x"}])
expect(openai.BadRequestError, model="tiny-chat", messages=[{"role": "user", "content": "x"}],
       top_p=5)
expect(openai.BadRequestError, model="tiny-chat",
       messages=[{"role": "user", "content": "x" * 500}])
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("openai", openai.__version__, "client: all checks passed")
"#;

/// `python3` with the client importable, and the PYTHONPATH that makes it so.
fn python_with_openai() -> Result<String, String> {
    let pyenv = repo().join(".tools/pyenv");
    let python_path = match std::env::var("PYTHONPATH") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", pyenv.display()),
        _ => pyenv.display().to_string(),
    };
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &python_path)
        .output()
        .map_err(|e| format!("python3 is not available ({e})"))?;
    if probe.status.success() {
        Ok(python_path)
    } else {
        Err(format!(
            "`import openai` fails ({}); install it with `pip install --target .tools/pyenv openai`",
            String::from_utf8_lossy(&probe.stderr).trim()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    let python_path = match python_with_openai() {
        Ok(path) => path,
        Err(why) => {
            println!("NOT RUN: the openai Python client test: {why}");
            return;
        }
    };
    let config = kiln_server::ServeConfig {
        api_keys: vec!["test-key".into()],
        ..config_for(tiny_chat_model())
    };
    let server = TestServer::start(config).await;
    let base_url = server.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", CLIENT_SCRIPT])
            .env("PYTHONPATH", python_path)
            .env("KILN_BASE_URL", base_url)
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_API_KEY")
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    println!("{}", stdout.trim());
}
