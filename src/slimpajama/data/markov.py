"""A synthetic source with a known answer: token streams from a random first-order Markov chain.

Tokens are the chain's states (no tokenizer), so the best achievable cross-entropy of any model of
the stream is the chain's entropy rate  H = -sum_i pi_i sum_j P_ij log P_ij  (nats per token), with
pi the stationary distribution. A model that trains correctly approaches H from above.
"""

import numpy as np


class MarkovChain:
    def __init__(self, n_states: int = 64, concentration: float = 0.1, seed: int = 0):
        """Rows of the transition matrix are Dirichlet(concentration) draws: small values give
        peaked rows (low entropy), large values near-uniform rows (entropy near log n_states)."""
        if n_states < 2:
            raise ValueError(f"data.markov.n_states must be at least 2, got {n_states}")
        if concentration <= 0:
            raise ValueError(f"data.markov.concentration must be positive, got {concentration}")
        rng = np.random.default_rng(seed)
        self.n_states = n_states
        self.transition = rng.dirichlet(np.full(n_states, concentration), size=n_states)  # (S, S), rows sum to 1
        self.stationary = self._stationary(self.transition)

    @staticmethod
    def _stationary(p: np.ndarray) -> np.ndarray:
        """The left eigenvector of P for eigenvalue 1 (pi P = pi), normalised to sum to 1."""
        values, vectors = np.linalg.eig(p.T)
        pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
        pi = np.abs(pi)
        return pi / pi.sum()

    @property
    def entropy_rate(self) -> float:
        """Nats per token."""
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.nansum(np.where(self.transition > 0, self.transition * np.log(self.transition), 0.0), axis=1)
        return float(self.stationary @ row_entropy)

    def sample(self, n_tokens: int, seed: int, n_chains: int = 256) -> np.ndarray:
        """(n_chains, n_tokens // n_chains) states: independent stationary chains (each starts from pi),
        stepped together so that sampling is vectorised."""
        rng = np.random.default_rng(seed)
        length = max(1, n_tokens // n_chains)
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0
        out = np.empty((n_chains, length), dtype=np.int32)
        state = rng.choice(self.n_states, size=n_chains, p=self.stationary)
        for t in range(length):
            out[:, t] = state
            u = rng.random(n_chains)[:, None]
            state = (cdf[state] < u).sum(axis=1)  # inverse-CDF draw of each chain's next state
        return out
