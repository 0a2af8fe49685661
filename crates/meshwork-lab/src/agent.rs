//! The lab's client: it submits one signed transfer every `interval` to the service its user
//! talks to (the user's own node, or the server) and records each attempt, until it is
//! stopped. Availability, acceptance and confirmation figures are computed from these records.
//!
//! The in-process runner runs it as a task; the netns runner runs `meshwork lab agent` in the
//! user's host, which prints one [`Attempt`] per line as JSON. Records carry wall-clock
//! microseconds, which the processes of one machine share.
//!
//! The agent keeps its own next nonce, so that it needs one request per attempt. After any
//! failure it asks the service again before the next attempt: a transfer whose answer was lost
//! may have been accepted, and its nonce is then used.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use meshwork_ledger::{Address, Hash, Wallet};
use serde::{Deserialize, Serialize};

use crate::api::{Api, Submitted};

/// Whole attempts give up after this (a link that drops packets makes connects hang).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One submission.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// When it began, in microseconds since the Unix epoch.
    pub at_us: u64,
    /// How long until the answer (or the failure).
    pub ms: f64,
    /// The transfer's id, when the service accepted it.
    pub accepted: Option<String>,
    pub error: Option<String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.accepted.is_some()
    }
}

pub struct Agent {
    pub target: Api,
    pub wallet: Wallet,
    pub to: Address,
    pub interval: Duration,
}

impl Agent {
    /// Runs until the task is dropped (or the process killed), handing each attempt to `sink`.
    pub async fn run(self, sink: impl FnMut(Attempt)) {
        self.run_unless(|| false, sink).await
    }

    /// [`Agent::run`], but while `cut()` holds, attempts fail without a request: the
    /// in-process runner's stand-in for a client whose link is down.
    pub async fn run_unless(self, cut: impl Fn() -> bool, mut sink: impl FnMut(Attempt)) {
        let mut chain: Option<Hash> = None;
        let mut nonce: Option<u64> = None;
        let mut tick = tokio::time::interval(self.interval);
        // A slow attempt delays the next ones rather than causing a burst after it.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let at_us = meshwork_node::unix_micros();
            let t0 = Instant::now();
            let r = if cut() {
                Err(anyhow!("the link is cut"))
            } else {
                tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(&mut chain, &mut nonce))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within {ATTEMPT_TIMEOUT:?}")))
            };
            if r.is_err() {
                nonce = None;
            }
            sink(Attempt {
                at_us,
                ms: t0.elapsed().as_secs_f64() * 1000.0,
                accepted: r.as_ref().ok().map(|id| id.to_string()),
                error: r.err().map(|e| format!("{e:#}")),
            });
        }
    }

    async fn attempt(&self, chain: &mut Option<Hash>, nonce: &mut Option<u64>) -> Result<Hash> {
        let chain_id = match *chain {
            Some(c) => c,
            None => *chain.insert(self.target.chain_id().await?),
        };
        let n = match *nonce {
            Some(n) => n,
            None => {
                self.target
                    .account(&self.wallet.address())
                    .await?
                    .next_nonce
            }
        };
        let t = self.wallet.transfer(chain_id, self.to, 1, 1, n);
        match self.target.submit(&t).await? {
            Submitted::Accepted(id) => {
                *nonce = Some(n + 1);
                Ok(id)
            }
            Submitted::Refused(why) => Err(anyhow!("refused: {why}")),
        }
    }
}
