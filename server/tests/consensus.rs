//! `POST /v1/consensus`: texts embedded by a served encoder or embeddings sent directly go
//! through the consensus game to one decision; every malformed request is a 400 with an
//! OpenAI-shaped error, never a 500.

mod common;

use common::{config_for, fixture, tiny_chat_model, TestServer};
use serde_json::{json, Value};

/// Proposals 0, 1, 2 are close (1 and 2 mirror each other around 0), 3 is far away.
fn proposals() -> Value {
    json!([
        [1.0, 0.0, 0.0],
        [0.9, 0.1, 0.0],
        [0.9, -0.1, 0.0],
        [-1.0, 0.0, 1.0]
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_are_embedded_by_the_encoder_and_decided() {
    let server = TestServer::start(config_for(fixture("tiny-bert"))).await;
    let texts = ["blue sky", "red apple", "red apple", "green apple"];
    let (status, answer) = server
        .post(
            "/v1/consensus",
            &json!({"proposals": texts, "include_similarity": true, "iterations": 300}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "consensus");
    assert_eq!(answer["method"], "hedge");
    let winner = answer["winner"].as_u64().unwrap() as usize;
    assert_eq!(answer["winner_text"], texts[winner]);
    assert_eq!(answer["agent_support"].as_array().unwrap().len(), 4);
    let support: f64 = answer["proposal_support"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((support - 1.0).abs() < 1e-4, "supports sum to 1: {support}");
    // Identical texts have identical embeddings: similarity 1 between proposals 1 and 2.
    let s = &answer["similarity"];
    assert!((s[1][2].as_f64().unwrap() - 1.0).abs() < 1e-5, "{s}");
    assert!(answer["nashconv"].as_f64().unwrap() >= -1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_need_no_encoder_and_bad_requests_are_400() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let (status, answer) = server
        .post(
            "/v1/consensus",
            &json!({"embeddings": proposals(), "iterations": 1000, "eta": 1.0,
                    "method": "optimistic_hedge"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["winner"], 0, "{answer}");
    assert!(answer.get("similarity").is_none());
    assert!(answer["nashconv"].as_f64().unwrap() < 1e-3, "{answer}");
    let bad = [
        json!({}),
        json!({"proposals": ["a", "b"]}),
        json!({"proposals": ["a"], "embeddings": [[1.0]]}),
        json!({"embeddings": []}),
        json!({"embeddings": [[]]}),
        json!({"embeddings": [[1.0, 2.0], [3.0]]}),
        json!({"embeddings": [["x"]]}),
        json!({"embeddings": proposals(), "method": "plurality"}),
        json!({"embeddings": proposals(), "iterations": 0}),
        json!({"embeddings": proposals(), "iterations": 100_000_000}),
        json!({"embeddings": proposals(), "preferences": [[1.0, 0.0]]}),
        json!({"embeddings": proposals(), "preferences": []}),
        json!({"embeddings": proposals(), "eta": -1.0}),
        json!({"embeddings": proposals(), "temperature": 1.0}),
        json!({"embeddings": proposals(), "model": "no-such-model"}),
    ];
    for body in bad {
        let (status, answer) = server.post("/v1/consensus", &body).await;
        let expected = if body.get("model").is_some() {
            404
        } else {
            400
        };
        assert_eq!(status, expected, "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}: {answer}"
        );
    }
}
