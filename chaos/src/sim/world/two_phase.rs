//! The simulated clients' two-phase transfers: [`crate::two_phase::TwoPhaseLoad`] with
//! timeouts in the simulated clock's terms, each operation a one-operation envelope.

use rand::Rng;
use tally_client::envelope::build_envelope;
use tally_wire::PublicKey;

use super::World;
use crate::envelopes::SentEnvelope;
use crate::history::Effect;
use crate::two_phase::TwoPhaseLoad;

/// The fraction of a client's new writes (other than envelopes) that are two-phase operations.
pub(super) const TWO_PHASE_FRACTION: f64 = 0.15;

/// Short timeouts span one to a few dozen 10 ms ticks (batch windows are 1 to 4 ticks), so many
/// reserves expire, some during a partition or a leader change; long ones last seconds.
pub(super) fn sim_load() -> TwoPhaseLoad {
    TwoPhaseLoad::new(20..400, 1_500..12_000)
}

impl World {
    /// A new one-operation envelope with a two-phase operation, for client `c`.
    pub(super) fn new_two_phase(&mut self, c: usize) -> usize {
        let accounts: Vec<PublicKey> = (self.accounts.iter())
            .map(|k| k.verifying_key().to_bytes())
            .collect();
        let mut next_id = self.next_id;
        let mut take = || {
            next_id += 1;
            next_id - 1
        };
        let (signer, op) = self.two_phase.draw(&mut self.rng, &accounts, &mut take);
        self.next_id = next_id;
        // Atomic: a failure is a refusal; independent: a failed receipt in the chain.
        let atomic = self.rng.gen_bool(0.5);
        let envelope = build_envelope(&self.accounts[signer], self.t.chain_id, atomic, vec![op]);
        self.stats.two_phase += 1;
        self.push_envelope(SentEnvelope::new(c, envelope, vec![Effect::TwoPhase]))
    }
}
