//! Consensus decisions among agents: proposals (embeddings, or texts embedded by an encoder
//! program such as `models/bert.kiln`) → cosine similarity → the consensus game of
//! `stdlib/consensus.kiln` → the chosen proposal, each agent's support and the NashConv of
//! the result. Shared by `kiln consensus` and the server's `POST /v1/consensus`.
//!
//! The game: N agents each back one of the K proposals; agent i's payoff for backing k is
//! `P[i][k] + λ Σ_{j≠i} (S σ_j)_k` (its own preference plus λ times the similarity of k to
//! what the others back). Without explicit preferences every proposal is one agent's
//! (N = K) and agent i prefers proposals similar to its own: `P = S`.

use crate::{CpuPlans, Executor, Interpreter, RuntimeError, Weights};
use kiln_ir::{DType, Tensor};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// How the consensus game is played.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Hedge,
    OptimisticHedge,
    Replicator,
    FictitiousPlay,
}

impl Method {
    /// Every method, in the order the docs list them.
    pub const ALL: &'static [Method] = &[
        Method::Hedge,
        Method::OptimisticHedge,
        Method::Replicator,
        Method::FictitiousPlay,
    ];

    /// The name used on the command line, in the API and in the stdlib.
    pub fn name(self) -> &'static str {
        match self {
            Method::Hedge => "hedge",
            Method::OptimisticHedge => "optimistic_hedge",
            Method::Replicator => "replicator",
            Method::FictitiousPlay => "fictitious_play",
        }
    }

    /// The method called `name`.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.name() == name)
    }

    /// Every method's name, for error messages.
    pub fn names() -> String {
        Method::ALL
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One consensus question: K proposal embeddings of one width, optional preferences
/// [N][K], and the game's parameters.
#[derive(Clone, Debug)]
pub struct ConsensusRequest {
    pub embeddings: Vec<Vec<f32>>,
    pub preferences: Option<Vec<Vec<f32>>>,
    /// λ: how much agents value agreeing with the others.
    pub lambda: f32,
    pub iterations: usize,
    /// The step size of the Hedge family and of the replicator dynamics.
    pub eta: f32,
    pub method: Method,
}

impl ConsensusRequest {
    /// A request with the defaults of the docs: λ = 1, 200 iterations, η = 0.5, Hedge.
    pub fn new(embeddings: Vec<Vec<f32>>) -> ConsensusRequest {
        ConsensusRequest {
            embeddings,
            preferences: None,
            lambda: 1.0,
            iterations: 200,
            eta: 0.5,
            method: Method::Hedge,
        }
    }

    /// Checks shapes and values; the message says what is wrong with which field.
    pub fn validate(&self) -> Result<(), String> {
        let k = self.embeddings.len();
        if k == 0 {
            return Err("`proposals` is empty: give at least one proposal".into());
        }
        let d = self.embeddings[0].len();
        if d == 0 {
            return Err("proposal embeddings are empty".into());
        }
        for (i, e) in self.embeddings.iter().enumerate() {
            if e.len() != d {
                return Err(format!(
                    "proposal {i} has an embedding of width {}, proposal 0 of width {d}",
                    e.len()
                ));
            }
            if e.iter().any(|v| !v.is_finite()) {
                return Err(format!("proposal {i}'s embedding has a non-finite value"));
            }
        }
        if let Some(p) = &self.preferences {
            if p.is_empty() {
                return Err("`preferences` is empty: give one row per agent or omit it".into());
            }
            for (i, row) in p.iter().enumerate() {
                if row.len() != k {
                    return Err(format!(
                        "preferences row {i} has {} entries, expected one per proposal ({k})",
                        row.len()
                    ));
                }
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(format!("preferences row {i} has a non-finite value"));
                }
            }
        }
        if !self.lambda.is_finite() || !self.eta.is_finite() || self.eta < 0.0 {
            return Err("`lambda` must be finite and `eta` finite and non-negative".into());
        }
        if self.iterations == 0 || self.iterations > 1_000_000 {
            return Err(format!(
                "`iterations` must be between 1 and 1000000, got {}",
                self.iterations
            ));
        }
        Ok(())
    }
}

/// The outcome of a consensus question.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The chosen proposal: the largest total support, lowest index on ties.
    pub winner: usize,
    /// Each proposal's support: the agents' mean probability of backing it.
    pub proposal_support: Vec<f32>,
    /// Each agent's probability of backing the winner.
    pub agent_support: Vec<f32>,
    /// Each agent's mixed strategy over the proposals [N][K].
    pub strategies: Vec<Vec<f32>>,
    /// The cosine similarity of the proposals [K][K].
    pub similarity: Vec<Vec<f32>>,
    /// NashConv of the strategies (0 at a Nash equilibrium).
    pub nashconv: f32,
}

impl Decision {
    /// The decision as the JSON object of docs/consensus.md; the similarity matrix only when
    /// asked for.
    pub fn to_json(&self, with_similarity: bool) -> serde_json::Value {
        let mut out = serde_json::json!({
            "winner": self.winner,
            "proposal_support": self.proposal_support,
            "agent_support": self.agent_support,
            "strategies": self.strategies,
            "nashconv": self.nashconv,
        });
        if with_similarity {
            out["similarity"] = serde_json::json!(self.similarity);
        }
        out
    }
}

/// The program that answers a consensus question with `method`: entry `similarity` (the
/// cosine similarity of the proposals, the default preferences) and entry `decide`.
fn program_source(method: Method) -> String {
    let iters_and_eta = match method {
        Method::FictitiousPlay => "iters",
        _ => "iters, eta",
    };
    format!(
        "import consensus\n\
         fn similarity(E: f32[1, K, D]) -> f32[1, K, K] {{ cosine_similarity(E) }}\n\
         fn decide(E: f32[1, K, D], P: f32[1, N, K], lam: float, iters: int, eta: float) \
         -> (f32[1, K, K], f32[1, N, K], f32[1], i64[1], f32[1, K]) {{\n\
         let S = cosine_similarity(E)\n\
         let (sigma, nc, winner, support) = consensus_game_{method}(S, P, lam, {iters_and_eta})\n\
         (S, sigma, nc, winner, support)\n\
         }}\n"
    )
}

/// The consensus program of `method`, lowered.
pub fn lower_program(method: Method) -> Result<kiln_lower::Lowered, RuntimeError> {
    let source = program_source(method);
    let (program, mut diags) = kiln_lower::Program::load_source("consensus request", &source, None);
    let lowered = if diags.iter().any(|d| d.is_error()) {
        None
    } else {
        let (lowered, more) = kiln_lower::lower(&program, None, &kiln_lower::Options::default());
        diags.extend(more);
        lowered.filter(|_| !diags.iter().any(|d| d.is_error()))
    };
    lowered.ok_or_else(|| {
        RuntimeError::Input(format!(
            "the consensus program does not compile: {}",
            program.sources.render(&diags)
        ))
    })
}

/// Makes the executor a consensus program runs on (the interpreter, the CPU plans or the
/// GPU); called once per method a [`ConsensusSolver`] is asked for.
pub type ExecutorMaker = Box<
    dyn Fn(kiln_lower::Lowered) -> Result<Box<dyn Executor + Send>, RuntimeError> + Send + Sync,
>;

/// Answers consensus requests on one backend, compiling each method's program once (its
/// shapes are symbolic: one executor serves every request of that method).
pub struct ConsensusSolver {
    make: ExecutorMaker,
    executors: BTreeMap<&'static str, Box<dyn Executor + Send>>,
}

impl fmt::Debug for ConsensusSolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsensusSolver")
            .field("methods", &self.executors.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ConsensusSolver {
    /// A solver whose programs run on executors `make` builds.
    pub fn new(make: ExecutorMaker) -> ConsensusSolver {
        ConsensusSolver {
            make,
            executors: BTreeMap::new(),
        }
    }

    /// A solver on the reference interpreter.
    pub fn interpreter() -> ConsensusSolver {
        ConsensusSolver::new(Box::new(|lowered: kiln_lower::Lowered| {
            Ok(Box::new(Interpreter::new(
                lowered.module,
                Arc::new(Weights::default()),
            )) as Box<dyn Executor + Send>)
        }))
    }

    /// A solver on the compiled kernels run by the Cranelift CPU backend.
    pub fn cpu() -> ConsensusSolver {
        ConsensusSolver::new(Box::new(|lowered: kiln_lower::Lowered| {
            let plans = CpuPlans::compile(
                lowered.module,
                Arc::new(Weights::default()),
                &mut crate::progress::NoProgress,
            )?;
            Ok(Box::new(plans) as Box<dyn Executor + Send>)
        }))
    }

    /// Where the programs run, for messages ("" before the first request).
    pub fn describe(&self) -> String {
        self.executors
            .values()
            .next()
            .map(|e| e.describe())
            .unwrap_or_default()
    }

    /// Answers `request`.
    pub fn decide(&mut self, request: &ConsensusRequest) -> Result<Decision, RuntimeError> {
        request.validate().map_err(RuntimeError::Input)?;
        let name = request.method.name();
        if !self.executors.contains_key(name) {
            let executor = (self.make)(lower_program(request.method)?)?;
            self.executors.insert(name, executor);
        }
        let executor = self.executors.get_mut(name).expect("inserted above");
        let k = request.embeddings.len();
        let d = request.embeddings[0].len();
        let embeddings = Tensor::from_f32(&[1, k, d], request.embeddings.concat());
        // Without preferences, agent i (who proposed i) prefers proposals similar to its own.
        let preferences = match &request.preferences {
            Some(p) => Tensor::from_f32(&[1, p.len(), k], p.concat()),
            None => {
                let s = executor.run("similarity", std::slice::from_ref(&embeddings))?;
                Tensor::from_f32(&[1, k, k], s[0].to_f32_vec())
            }
        };
        let n = preferences.shape[1];
        let inputs = [
            embeddings,
            preferences,
            Tensor::from_f32(&[], vec![request.lambda]),
            Tensor::from_ints(DType::I64, &[], vec![request.iterations as i64]),
            Tensor::from_f32(&[], vec![request.eta]),
        ];
        let results = executor.run("decide", &inputs)?;
        let [s, sigma, nc, winner, support] = results.as_slice() else {
            return Err(RuntimeError::Input(format!(
                "the consensus program returned {} results, expected 5",
                results.len()
            )));
        };
        let similarity = s.to_f32_vec().chunks(k).map(<[f32]>::to_vec).collect();
        let strategies: Vec<Vec<f32>> = sigma.to_f32_vec().chunks(k).map(<[f32]>::to_vec).collect();
        let winner = winner.to_i64_vec()[0] as usize;
        debug_assert_eq!(strategies.len(), n);
        Ok(Decision {
            winner,
            proposal_support: support.to_f32_vec(),
            agent_support: strategies.iter().map(|row| row[winner]).collect(),
            strategies,
            similarity,
            nashconv: nc.to_f32_vec()[0],
        })
    }
}

/// Answers `request` on the reference interpreter.
pub fn decide(request: &ConsensusRequest) -> Result<Decision, RuntimeError> {
    ConsensusSolver::interpreter().decide(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposals() -> Vec<Vec<f32>> {
        vec![
            vec![0.9, 0.1, 0.0, 0.2],
            vec![0.8, 0.2, 0.1, 0.1],
            vec![0.1, 0.9, 0.3, 0.0],
            vec![0.85, 0.0, 0.05, 0.3],
        ]
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(*m));
        }
        assert_eq!(Method::from_name("plurality"), None);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut r = ConsensusRequest::new(vec![vec![1.0, 2.0], vec![3.0]]);
        assert!(r.validate().unwrap_err().contains("width 1"));
        r.embeddings = vec![];
        assert!(r.validate().unwrap_err().contains("empty"));
        r.embeddings = proposals();
        r.preferences = Some(vec![vec![1.0; 3]]);
        assert!(r.validate().unwrap_err().contains("one per proposal"));
        r.preferences = None;
        r.iterations = 0;
        assert!(r.validate().unwrap_err().contains("iterations"));
        r.iterations = 10;
        r.eta = f32::NAN;
        assert!(r.validate().is_err());
    }

    #[test]
    fn agents_attached_to_their_own_proposals_keep_them() {
        // Each agent's preference (1) outweighs λ times the similarity of the others' picks
        // (below 0.5 × 2): everyone keeps its own proposal, an exact equilibrium, and the
        // tie in support goes to the lowest index.
        let mut request = ConsensusRequest::new(proposals());
        request.preferences = Some(vec![
            vec![1.0, 0.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0, 0.0],
            vec![0.0, 0.0, 1.0, 0.0],
        ]);
        request.lambda = 0.5;
        request.method = Method::FictitiousPlay;
        request.iterations = 100;
        let d = decide(&request).expect("decide");
        assert_eq!(d.winner, 0);
        assert_eq!(d.agent_support, vec![1.0, 0.0, 0.0]);
        assert_eq!(d.nashconv, 0.0);
        assert_eq!(d.similarity.len(), 4);
        assert!((d.similarity[0][0] - 1.0).abs() < 1e-6);
    }
}
