"""The Pyro model and guide of ContrastiveBiVI and its baselines (paper sections 3-4).

One module covers four models through its arguments:

==================  ===========  ==========  ==================
model               n_salient    likelihood  counts
==================  ===========  ==========  ==================
ContrastiveBiVI     > 0          ``"cme"``   nascent + mature
biVI                0            ``"cme"``   nascent + mature
scVI                0            ``"nb"``/``"zinb"``  mature
contrastiveVI       > 0          ``"zinb"``/``"nb"``  mature
==================  ===========  ==========  ==================

Generative story (``model``), for cell ``i`` with label ``c_i``::

    z_i ~ Normal(0, I)                         site "z"
    t_i ~ Normal(mu_{c_i}, I)                  site "t", masked for controls (t_i = 0)
    salient_i = 0 for controls, else t_i       deterministic site "salient"
    rho_N, rho_M = softmax(f(z_i, salient_i))  decoder; deterministic "rho_nascent", ...
    mu_N = l^N_i rho_N,  mu_M = l^M_i rho_M    observed libraries; "mean_nascent", ...
    kinetic parameters of the scheme            "burst_size", ... (and "<name>_reference"
                                               at the batch's reference library, if any)
    (x^N_i, x^M_i) ~ BivariateCME(mu_N, mu_M, theta, scheme)     site "x"
    (mature-only models: x^M_i ~ NB/ZINB(mu_M, theta)            site "x_mature")

all inside ``pyro.plate("cells", n_cells, subsample=batch["index"])`` so a minibatch
gives an unbiased estimate of the full-data ELBO. The guide mirrors it with two
Gaussian encoders, ``q(z | x)`` and ``q(t | x)``. Controls mask ``t`` in BOTH the
model and the guide: with ``TraceMeanField_ELBO`` the analytic KL is masked by the
guide's mask, with ``Trace_ELBO`` the model's and guide's log-densities cancel only
when both are masked. With ``salient_prior="mixture"`` no cell is masked: a control's ``t``
follows the escaper component and is not decoded (see ``salient_mask``).
``kl_weight`` scales the latent sites (KL warm-up) in both.

Contract (relied on by :mod:`pybivi.posterior`, :mod:`pybivi.tl.de`, :mod:`pybivi.tl.ppc`)
------------------------------------------------------------------------------------
* ``model(batch, kl_weight=1.0, observe=True)`` and ``guide(batch, kl_weight=1.0, observe=True)``
  take the batch dictionaries of :mod:`pybivi.data` (optionally with
  ``reference_library_<species>``). Posterior draws trace the guide and replay the model,
  reading the deterministic sites (``salient``, ``mean_*``, ``rho_*``, kinetic parameters),
  so an overridden guide or prior is what every downstream analysis sees.
* ``encode(batch) -> {"z": (loc, scale), "t": (loc, scale)}`` (``"t"`` absent when
  ``n_salient == 0``).
* ``covariates(batch) -> Tensor | None``: the one-hot batch, one-hot categorical
  covariates and continuous covariates side by side, ``(B, n_covariates)``; ``None``
  for a module built without covariates. ``batch["decode_batch_index"]``, when
  present, replaces the batch the decoder sees (scvi-tools' ``transform_batch``); the
  encoders always read the observed batch.
* ``decode(z, t, library_nascent, library_mature, covariates=None) -> dict`` with ``"mu_nascent"``,
  ``"mu_mature"``, ``"rho_nascent"``, ``"rho_mature"`` (no nascent keys for mature-only
  models) and ``"zi_logits"`` for ZINB. ``t`` may be ``None`` (decoded as ``t = 0``);
  libraries are tensors ``(B,)``/``(S, B)`` or floats and broadcast.
* ``theta`` (positive ``(G,)``), ``scheme`` (a ReactionScheme, or ``None`` for
  mature-only models), ``likelihood`` in ``{"cme", "nb", "zinb"}``, ``n_background``,
  ``n_salient``.

Customising: subclass and override one small method: ``background_prior``,
``salient_prior``, ``likelihood_dist`` or ``decode`` (or the ``guide``), then hand the class
to a model, ``pybivi.ContrastiveBiVI(adata, module_cls=MyModule)``; it is trained, saved,
loaded, exported and tested like the default.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from pybivi._covariate_injection import CovariateInjection
from pybivi._responders import ResponderMixture, responder_escaper_mixture
from pybivi.nn import FrequencyDecoder, GaussianEncoder

LIKELIHOODS = ("cme", "nb", "zinb")
SALIENT_PRIORS = ("label", "standard", "mixture")


def _library(library: Tensor | float, like: Tensor) -> Tensor:
    """A library (float, ``(B,)`` or ``(S, B)``) as a tensor broadcasting with ``(..., B, G)``."""
    library = torch.as_tensor(library, dtype=like.dtype, device=like.device)
    return library.unsqueeze(-1) if library.dim() > 0 else library


class ContrastiveModule(CovariateInjection, ResponderMixture, nn.Module):
    """Pyro model and guide shared by ContrastiveBiVI, biVI, scVI and contrastiveVI.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_labels
        Number of perturbation labels (controls included); rows of the learned salient means.
    n_cells
        Size of the ``"cells"`` plate: the number of training cells.
    n_background, n_salient
        Latent dimensions of ``z`` and ``t``; ``n_salient = 0`` drops ``t``.
    n_hidden
        Width of the single hidden layer of every encoder and of the decoder.
    dropout
        Encoder dropout.
    likelihood
        ``"cme"`` (nascent + mature through :class:`pybivi.distributions.BivariateCME`),
        ``"nb"`` or ``"zinb"`` (mature counts only).
    scheme
        Reaction scheme name or object for ``likelihood="cme"``.
    salient_prior
        ``"label"``: ``t ~ Normal(mu_c, I)`` with a learned mean per label (ContrastiveBiVI);
        ``"standard"``: ``t ~ Normal(0, I)`` (contrastiveVI as in scvi-tools);
        ``"mixture"`` (beyond the paper): ``t ~ w_c Normal(mu_c, I) + (1 - w_c) Normal(0, I)``,
        a responder and an escaper component with a learned responder probability
        ``w_c = sigmoid(responder_logits[c])`` per label (see :meth:`responder_probability`).
    n_batch
        Number of batches (0: no batch); the batch enters one-hot.
    n_cats_per_covariate
        Number of categories of each categorical covariate (each enters one-hot).
    n_continuous_covariates
        Number of continuous covariates (each enters as its value).
    encode_covariates
        Whether the encoders read the covariates too (default, as in the original scVI);
        ``False`` feeds them to the decoder only (scvi-tools' ``encode_covariates=False``).

    Notes
    -----
    Covariates are injected as in scVI (:class:`~pybivi._covariate_injection.CovariateInjection`:
    ``n_covariates``, ``covariates``). Without covariates the networks are exactly those
    of the paper.
    """

    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        n_cells: int,
        n_background: int = 10,
        n_salient: int = 10,
        n_hidden: int = 128,
        dropout: float = 0.1,
        likelihood: str = "cme",
        scheme: Any = "bursty",
        salient_prior: str = "label",
        n_batch: int = 0,
        n_cats_per_covariate: tuple[int, ...] | list[int] = (),
        n_continuous_covariates: int = 0,
        encode_covariates: bool = True,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if salient_prior not in SALIENT_PRIORS:
            raise ValueError(
                f"salient_prior must be one of {SALIENT_PRIORS}, got {salient_prior!r}"
            )
        if n_background < 1 or n_salient < 0 or n_hidden < 1:
            raise ValueError("need n_background >= 1, n_salient >= 0 and n_hidden >= 1")
        if n_salient > 0 and salient_prior != "standard" and n_labels < 1:
            raise ValueError("salient latents with per-label means need at least one label")
        self.n_genes, self.n_labels, self.n_cells = int(n_genes), int(n_labels), int(n_cells)
        self.n_background, self.n_salient = int(n_background), int(n_salient)
        self.likelihood, self.salient_prior_kind = likelihood, salient_prior
        self.scheme = None
        if likelihood == "cme":
            from pybivi import schemes

            self.scheme = schemes.get(scheme) if isinstance(scheme, str) else scheme
        self.species = ("nascent", "mature") if likelihood == "cme" else ("mature",)
        n_input = n_genes * len(self.species)
        self.init_covariates(
            n_batch, n_cats_per_covariate, n_continuous_covariates, encode_covariates
        )
        n_cov = self.n_covariates
        n_enc_cov = n_cov if self.encode_covariates else 0
        self.z_encoder = GaussianEncoder(n_input, n_background, n_hidden, dropout, n_enc_cov)
        self.t_encoder = (
            GaussianEncoder(n_input, n_salient, n_hidden, dropout, n_enc_cov) if n_salient else None
        )
        self.decoder = FrequencyDecoder(
            n_background + n_salient, n_genes, self.species, n_hidden, likelihood == "zinb",
            n_covariates=n_cov,
        )
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        n_means = n_labels if (n_salient and salient_prior != "standard") else 0
        self.salient_means = nn.Parameter(torch.zeros(n_means, n_salient))
        if n_salient and salient_prior == "mixture":
            # Registered only for the mixture, so that other modules keep their state dict.
            # Logit 0 (w = 0.5): while mu_c is still near 0 the two components coincide.
            self.responder_logits = nn.Parameter(torch.zeros(n_labels))
        # A unique name keeps two modules' parameters apart in Pyro's global param store.
        self.pyro_name = f"pybivi_{uuid.uuid4().hex[:8]}"

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu() end here: also move a user's scheme backend that holds tensors
        # (a backend is not a submodule: it must not be trained or saved with us). The
        # shipped bursty approximator is shared by every model and follows its inputs'
        # device by itself, so it is left where it is.
        out = super()._apply(fn, *args, **kwargs)
        backend = getattr(self.scheme, "backend", None)
        if isinstance(backend, nn.Module) and not getattr(backend, "follows_input_device", False):
            backend.to(self.log_theta.device)
        return out

    # ----------------------------------------------------------------- pieces
    @property
    def theta(self) -> Tensor:
        """Per-gene positive shape ``theta`` (``1 / beta`` for the bursty scheme)."""
        return self.log_theta.exp()

    def encoder_input(self, batch: dict[str, Tensor]) -> Tensor:
        """The counts the encoders read: nascent and mature side by side, or mature only."""
        return torch.cat([batch[f"x_{s}"] for s in self.species], dim=-1)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Variational parameters ``{"z": (loc, scale), "t": (loc, scale)}``."""
        counts = self.encoder_input(batch)
        extra = self.encoder_covariates(batch)
        out = {"z": self.z_encoder(counts, **extra)}
        if self.t_encoder is not None:
            out["t"] = self.t_encoder(counts, **extra)
        return out

    def decode(
        self,
        z: Tensor,
        t: Tensor | None,
        library_nascent: Tensor | float | None,
        library_mature: Tensor | float,
        covariates: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Decoder means: ``mu_<species> = library_<species> * rho_<species>``.

        ``covariates`` (from :meth:`covariates`) is required by a module with covariates.
        """
        if self.n_salient:
            if t is None:
                t = z.new_zeros(*z.shape[:-1], self.n_salient)
            # Predictive may hand z and t different leading sample axes: broadcast them.
            lead = torch.broadcast_shapes(z.shape[:-1], t.shape[:-1])
            latent = torch.cat([z.expand(*lead, z.shape[-1]), t.expand(*lead, t.shape[-1])], -1)
        else:
            latent = z
        out = self.decoder(latent, covariates) if self.n_covariates else self.decoder(latent)
        libraries = {"nascent": library_nascent, "mature": library_mature}
        for s in self.species:
            out[f"mu_{s}"] = _library(libraries[s], out[f"rho_{s}"]) * out[f"rho_{s}"]
        return out

    def background_prior(self, batch: dict[str, Tensor]) -> dist.Distribution:
        """``p(z) = Normal(0, I)``."""
        loc = batch["x_mature"].new_zeros(batch["x_mature"].shape[0], self.n_background)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def _salient_label(self, batch: dict[str, Tensor]) -> Tensor:
        """Each cell's label row; controls' (possibly unknown) labels clamped to a valid row."""
        label = batch["label"]
        if bool(((label < 0) & ~batch["is_control"]).any()):
            raise ValueError("a perturbed cell carries a label the model was not trained on")
        return label.clamp(min=0)  # controls are masked out

    def salient_prior(self, batch: dict[str, Tensor]) -> dist.Distribution:
        """``p(t | c) = Normal(mu_c, I)``, or ``Normal(0, I)`` if ``salient_prior="standard"``.

        With ``salient_prior="mixture"``, ``w_c Normal(mu_c, I) + (1 - w_c) Normal(0, I)``:
        it has no closed-form KL to the guide's normal, so ``TraceMeanField_ELBO`` estimates
        that one term by Monte Carlo (``log q(t) - log p(t)`` at the sampled ``t``) and keeps
        the other KLs analytic.
        """
        n = batch["x_mature"].shape[0]
        if self.salient_prior_kind == "standard":
            loc = batch["x_mature"].new_zeros(n, self.n_salient)
            return dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        label = self._salient_label(batch)
        loc = self.salient_means[label]
        if self.salient_prior_kind == "mixture":
            return responder_escaper_mixture(loc, self.responder_logit(batch, label))
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def likelihood_dist(self, decoded: dict[str, Tensor]) -> dist.Distribution:
        """Law of one cell's counts given the decoder output (event over genes)."""
        from pybivi import distributions as D

        # Inputs are trusted here (validated at setup); skipping checks saves a device sync.

        if self.likelihood == "cme":
            law = D.BivariateCME(
                decoded["mu_nascent"],
                decoded["mu_mature"],
                self.theta,
                scheme=self.scheme,
                validate_args=False,
            )
        elif self.likelihood == "nb":
            law = D.NegativeBinomial(decoded["mu_mature"], self.theta, validate_args=False)
        else:
            law = D.ZeroInflatedNegativeBinomial(
                decoded["mu_mature"], self.theta, decoded["zi_logits"], validate_args=False
            )
        return law.to_event(1)

    def observation(self, batch: dict[str, Tensor]) -> tuple[str, Tensor]:
        """Site name and observed value: ``("x", (B, G, 2))`` or ``("x_mature", (B, G))``."""
        if self.likelihood == "cme":
            return "x", torch.stack([batch["x_nascent"], batch["x_mature"]], dim=-1)
        return "x_mature", batch["x_mature"]

    # ---------------------------------------------------------- model / guide
    def _plate(self, batch: dict[str, Tensor]) -> pyro.plate:
        return pyro.plate("cells", self.n_cells, subsample=batch["index"])

    def derived_quantities(self, decoded: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per cell-and-gene quantities of one decoding: ``mean_<species>``, ``rho_<species>``
        and the scheme's kinetic parameters (named by ``scheme.kinetic_param_names``)."""
        out = {}
        for s in self.species:
            out[f"mean_{s}"] = decoded[f"mu_{s}"]
            if f"rho_{s}" in decoded:  # a user's decoder may return the means only
                out[f"rho_{s}"] = decoded[f"rho_{s}"]
        if self.scheme is not None and "mu_nascent" in decoded:
            kinetic = self.scheme.kinetic_params(
                decoded["mu_nascent"], decoded["mu_mature"], self.theta
            )
            shape = decoded["mu_nascent"].shape
            for k in self.scheme.kinetic_param_names:
                out[k] = torch.broadcast_to(kinetic[k], shape)
        return out

    def model(self, batch: dict[str, Tensor], kl_weight: float = 1.0, observe: bool = True):
        """Generative model; ``observe=False`` samples the counts instead of observing them.

        Besides the sample sites ``z``, ``t`` and ``x`` (``x_mature``), the model records
        deterministic sites, which :class:`pyro.infer.Predictive` and the posterior export
        return by name: ``salient`` (``t`` with controls at exactly 0) and, per cell and
        gene, ``mean_<species>``, ``rho_<species>`` and the scheme's kinetic parameters at
        the observed libraries. When the batch carries ``reference_library_<species>``
        (numbers), the means and kinetic parameters are also recorded at that library,
        under the same names with the suffix ``_reference``.
        """
        pyro.module(self.pyro_name, self)
        control = batch["is_control"]
        with self._plate(batch):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.background_prior(batch))
                t = None
                if self.n_salient:
                    with poutine.mask(mask=self.salient_mask(batch)):
                        t = pyro.sample("t", self.salient_prior(batch))
                    # The one place of the control rule: controls have t = 0 exactly (a point
                    # mass), whatever was drawn; torch.where also blocks their gradient to q(t).
                    t = torch.where(control.unsqueeze(-1), torch.zeros_like(t), t)
                    pyro.deterministic("salient", t, event_dim=1)
            extra = self.decoder_covariates(batch)
            decoded = self.decode(
                z, t, batch.get("library_nascent"), batch["library_mature"], **extra
            )
            for key, value in self.derived_quantities(decoded).items():
                pyro.deterministic(key, value, event_dim=1)
            if "reference_library_mature" in batch:
                at_reference = self.decode(
                    z, t, batch.get("reference_library_nascent"), batch["reference_library_mature"],
                    **extra,
                )
                for key, value in self.derived_quantities(at_reference).items():
                    if not key.startswith("rho_"):  # the frequencies do not depend on it
                        pyro.deterministic(f"{key}_reference", value, event_dim=1)
            name, value = self.observation(batch)
            return pyro.sample(name, self.likelihood_dist(decoded), obs=value if observe else None)

    def guide(self, batch: dict[str, Tensor], kl_weight: float = 1.0, observe: bool = True):
        """Amortised mean-field guide ``q(z | x) q(t | x)``; ``t`` masked as in the model."""
        pyro.module(self.pyro_name, self)
        params = self.encode(batch)
        with self._plate(batch), poutine.scale(scale=kl_weight):
            z = pyro.sample("z", dist.Normal(*params["z"]).to_event(1))
            if self.n_salient:
                with poutine.mask(mask=self.salient_mask(batch)):
                    pyro.sample("t", dist.Normal(*params["t"]).to_event(1))
        return z
