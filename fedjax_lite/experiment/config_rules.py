"""Cross-field rules of a config (which keys and values go together), applied by
:func:`fedjax_lite.experiment.config.parse` after the types and ranges are checked, and
the accounting setup of a DP run. Each raises :class:`ConfigError` naming the key."""

from __future__ import annotations

from fedjax_lite.experiment.config_schema import (PARTITION_KEYS, RATINGS_DATA,
                                                  RECOMMENDATION_ALGORITHMS, Config,
                                                  ConfigError, LeafData, SklearnDigitsData)


def _only_for(raw: dict, section: str, name: str, keys: dict, field: str = "name") -> None:
    for key, owners in keys.items():
        if key in raw and name not in owners:
            raise ConfigError(f"config key '{section}.{key}' applies only to "
                              f"{section}.{field} in ({', '.join(owners)}), not {name!r}")


def _check_example_data(config: Config, raw: dict) -> None:
    """The leaf and sklearn_digits data kinds: required keys, partition keys that apply
    to the chosen partition only, and a model whose classes cover the digits."""
    d = config.data
    if isinstance(d, LeafData) and not d.path:
        raise ConfigError("config key 'data.path' is required for data kind 'leaf' (a LEAF "
                          "JSON file or a directory of them)")
    if not isinstance(d, SklearnDigitsData):
        return
    _only_for((raw.get("data") or {}).get("partition") or {}, "data.partition",
              d.partition.kind, PARTITION_KEYS, field="kind")
    if config.model.kind == "logistic_regression":
        raise ConfigError("config key 'model.kind': logistic_regression is binary but "
                          "sklearn_digits has 10 classes; use multinomial_logistic_regression "
                          "with num_classes: 10")
    if config.num_classes < 10:
        raise ConfigError(f"config key 'model.num_classes': got {config.num_classes}, but "
                          "sklearn_digits has 10 classes (labels 0-9); use 10")


def _check_recommendation(config: Config) -> None:
    """Ratings data, the MF model and the recommendation algorithms go together."""
    ratings = config.data.kind in RATINGS_DATA
    mf = config.model.kind == "matrix_factorization"
    rec = config.algorithm.name in RECOMMENDATION_ALGORITHMS
    if ratings != mf or mf != rec:
        raise ConfigError(
            "config keys 'data.kind', 'model.kind', 'algorithm.name': ratings data "
            f"({', '.join(RATINGS_DATA)}), model matrix_factorization and algorithm "
            f"{' / '.join(RECOMMENDATION_ALGORITHMS)} go together; got data "
            f"{config.data.kind!r}, model {config.model.kind!r}, algorithm "
            f"{config.algorithm.name!r}")
    if rec and config.eval.train:
        raise ConfigError("config key 'eval.train': the recommenders report their own "
                          "metrics (eval_rmse, ranking); eval.train is for classification")
    if not rec:
        if config.eval.ranking:
            raise ConfigError("config key 'eval.ranking': ranking metrics are defined for "
                              "the recommenders (ratings data), not "
                              f"{config.algorithm.name!r}")
        return
    if config.model.objective == "bce" and not config.eval.ranking:
        raise ConfigError("config key 'model.objective': bce (implicit feedback) is "
                          "evaluated by ranking; set eval.ranking: true")
    if config.data.kind == "movielens" and not config.data.path:
        raise ConfigError("config key 'data.path' is required for data kind 'movielens' (a "
                          "directory as GroupLens distributes it, e.g. ml-100k/)")
    agg = config.aggregator.name
    if agg not in ("mean", "dp_gaussian"):
        raise ConfigError(f"config key 'aggregator.name': {config.algorithm.name} sends "
                          f"sparse item updates; it takes mean or dp_gaussian, not {agg!r}")
    if config.attack.kind != "none" or config.compression.kind != "none":
        raise ConfigError(f"config keys 'attack', 'compression': not defined for the sparse "
                          f"item updates of {config.algorithm.name}")
    if agg == "dp_gaussian":
        if config.aggregator.target_quantile is not None:
            raise ConfigError("config key 'aggregator.target_quantile': adaptive clipping is "
                              "not available for sparse updates yet")
        if config.algorithm.item_aggregation != "all":
            raise ConfigError("config key 'algorithm.item_aggregation': dp_gaussian divides "
                              "by a fixed denominator (how many users rated an item is "
                              "client data); set item_aggregation: all")
        if not config.privacy.nonprivate_diagnostics:
            raise ConfigError(
                "config key 'privacy.nonprivate_diagnostics': the RMSE of a recommender is "
                "measured on the users' own held-out ratings with their private factors, "
                "outside the accounted mechanism; set it to true to run (the summary then "
                "says the metrics are non-private diagnostics)")


def _check_personal(config: Config) -> None:
    """Ditto evaluates client k's personal model on client k's own test examples: the test
    population must hold the training clients, row by row."""
    d = config.data
    split = getattr(d, "test_split", None)
    if getattr(d, "test_path", None) or split == "examples" or (
            split == "auto" and not config.is_private):
        return
    why = (f"data.test_split is {split!r} (test clients of its own)" if split is not None
           else f"data kind {d.kind!r} holds out its own test clients")
    raise ConfigError(f"config key 'algorithm.name': ditto evaluates each training "
                      f"client's personal model on that client's own held-out examples, "
                      f"but {why}; use data.test_split: examples (synthetic, npz, leaf and "
                      f"sklearn_digits data)")


# Algorithms whose server update uses client data outside the aggregator, so a DP
# aggregator would not cover it (issue: SCAFFOLD's server control variate is the plain mean
# of the clients' control-variate updates; FedNova rescales the noised update by tau_eff,
# a function of the cohort's exact example counts).
NOT_PRIVATE_WITH_DP = {
    "scaffold": "its server control variate is updated from the clients' unclipped, "
                "un-noised control variates",
    "fednova": "its update is rescaled by tau_eff, computed from the cohort's exact "
               "example counts outside the mechanism",
}


def _check_private(config: Config, raw: dict) -> None:
    """A DP aggregator's config must be accountable and leak nothing outside the mechanism."""
    from fedjax_lite.privacy import accounting
    agg, algo, privacy = config.aggregator, config.algorithm, config.privacy
    if algo.name in NOT_PRIVATE_WITH_DP:
        raise ConfigError(f"config key 'algorithm.name': {algo.name} cannot be combined with "
                          f"aggregator {agg.name}: {NOT_PRIVATE_WITH_DP[algo.name]}; use "
                          "fedavg, fedprox, fedsgd or a FedOpt variant")
    if algo.name == "ditto" and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'algorithm.name': ditto's personal models are trained "
                          "on each client's data outside the DP mechanism (only the global "
                          "update goes through it), so their evaluation is a non-private "
                          "diagnostic; set privacy.nonprivate_diagnostics: true to run")
    if config.eval.train and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'eval.train': the loss on the training clients is "
                          "computed from their data outside the DP mechanism; set "
                          "privacy.nonprivate_diagnostics: true to log it anyway")
    if getattr(config.data, "test_split", None) == "examples" and not getattr(
            config.data, "test_path", None) and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'data.test_split': examples evaluates every training "
                          "client's own held-out examples, which the privacy guarantee does "
                          "not cover; use clients (whole clients held out, the default for "
                          "DP runs) or a separate test file")
    mechanism = "ftrl" if agg.name == "dp_ftrl" else "gaussian"
    if privacy.neighboring == "add_remove" and algo.sampling != "poisson" and (
            mechanism == "gaussian" or algo.sampling == "epochs"):
        why = ("adding a client pushes another out of a full cohort, so the sum moves by "
               "2S" if algo.sampling == "fixed" else "adding a client reshuffles every "
               "client's schedule")
        raise ConfigError(f"config key 'privacy.neighboring': add_remove is not valid with "
                          f"algorithm.sampling {algo.sampling} ({why}); use sampling: "
                          "poisson, or neighboring: replace_one")
    if agg.name == "dp_secure_mean" and algo.sampling == "poisson":
        raise ConfigError("config key 'algorithm.sampling': dp_secure_mean aborts a round "
                          "below aggregator.min_survivors, and with Poisson sampling whether "
                          "that happens depends on the cohort size, a count of clients that "
                          "the accounting does not cover; use sampling: fixed or epochs")
    population = max(getattr(config.data, "num_clients", 0), algo.clients_per_round + 1)
    setup = privacy_setup(config, population, noise_multiplier=1.0)
    if agg.target_quantile is not None and setup.neighboring == "zero_out":
        raise ConfigError("config key 'aggregator.target_quantile': adaptive clipping is "
                          "accounted with a clipped-count sensitivity of 1/2, which holds "
                          "under add_remove and (doubled with the sum's) replace_one, not "
                          "under zero_out (a zeroed client's bit flips the count by 1); set "
                          "privacy.neighboring to add_remove (poisson) or replace_one")

    try:
        accounting.check(setup)
    except accounting.AccountingError as e:
        raise ConfigError(f"config key 'privacy': {e}") from None
    if agg.target_quantile is not None and agg.name != "dp_gaussian":  # pragma: no cover
        raise ConfigError("config key 'aggregator.target_quantile' applies to dp_gaussian")


def privacy_setup(config: Config, population: int, noise_multiplier: float | None = None):
    """The :class:`fedjax_lite.privacy.accounting.PrivacySetup` of a DP run."""
    from fedjax_lite.privacy import accounting
    agg, algo, privacy = config.aggregator, config.algorithm, config.privacy
    mechanism = "ftrl" if agg.name == "dp_ftrl" else "gaussian"
    z = agg.noise_multiplier if noise_multiplier is None else noise_multiplier
    restart = agg.restart_every
    if mechanism == "ftrl" and restart is None and algo.sampling == "epochs":
        restart = -(-population // algo.clients_per_round)
    return accounting.PrivacySetup(
        noise_multiplier=1.0 if z is None else float(z), population=int(population),
        cohort_size=algo.clients_per_round, sampling=algo.sampling,
        neighboring=privacy.neighboring or accounting.default_neighboring(algo.sampling,
                                                                          mechanism),
        accountant=privacy.accountant, mechanism=mechanism, restart_every=restart)
