"""What an evaluation row measures, compiled once per run (the runner calls
:meth:`Evaluation.metrics` at round 0, every ``eval_every`` rounds and the last round).

* the global model on the test clients: ``eval_loss`` / ``eval_accuracy`` and their
  client means (:func:`fedjax_lite.core.evaluate.build_evaluate`); a recommender's RMSE
  and ranking metrics with its users' private factors (:mod:`.build_recsys`); with
  ``mmap`` storage the test clients stream through in blocks;
* ``eval.train``: the global model on the training population (``eval_train_loss`` /
  ``eval_train_accuracy``), read where the population lives;
* personal models (Ditto's ``state.personal``): client k's own model on test client k
  (``eval_personal_*``).
"""

from __future__ import annotations

from fedjax_lite.core import build_evaluate
from fedjax_lite.core.evaluate import build_evaluate_sums, finish_evaluate
from fedjax_lite.experiment import build_recsys, storage


class Evaluation:
    """Compiled evaluations of one run. ``metrics(state)`` -> {name: float};
    ``per_user``: a recommender's last per-user sums (None before the first)."""

    def __init__(self, config, model, state, *, engine, where_data: str, train, test,
                 population, put, jit, init_key=None, rec_data=None):
        on_device = where_data == "device"
        eval_engine = engine._replace(chunk_size=None if engine.chunk_size is None
                                      else 4 * engine.chunk_size, population_sharded=False)
        test_data = put(test.arrays()) if where_data != "mmap" else None
        self.per_user = None
        if rec_data is not None:   # RMSE needs the users' private factors (or their
            rec_eval = build_recsys.build_evaluation(config, model, init_key, engine)
            rec_inputs = put(({"x": rec_data.rated.item, "n": rec_data.rated.n},
                              rec_data.negatives))        # reconstruction)
            # fcf's evaluation reads the stored factors, not the ratings: with host
            # storage it gets the users' counts only
            eval_train = population if on_device else put({"n": train.n})
            compiled = jit(rec_eval).lower(state, eval_train, test_data,
                                           *rec_inputs).compile()

            def on_test(st):
                metrics, self.per_user = compiled(st, eval_train, test_data, *rec_inputs)
                return metrics
        elif where_data == "mmap":       # the test clients stream through in blocks
            blocked = storage.blocked_evaluate(build_evaluate_sums(model, eval_engine),
                                               finish_evaluate, test, put)
            on_test = lambda st: blocked(st.params)
        else:
            compiled = jit(build_evaluate(model, eval_engine)).lower(
                state.params, test_data).compile()
            on_test = lambda st: compiled(st.params, test_data)
        self._on_test = on_test
        self._on_train = None      # eval.train: the global model on the training clients
        if config.eval.train:
            if on_device:          # (a sharded population is read where it lives)
                compiled_train = jit(build_evaluate(model, eval_engine._replace(
                    population_sharded=engine.population_sharded))).lower(
                    state.params, population).compile()
                self._on_train = lambda st: compiled_train(st.params, population)
            else:
                blocked_train = storage.blocked_evaluate(
                    build_evaluate_sums(model, eval_engine), finish_evaluate, train, put)
                self._on_train = lambda st: blocked_train(st.params)
        self._personal = None      # client k's personal model on client k's test data
        if getattr(state, "personal", None) is not None:
            own_sums = build_evaluate_sums(model, eval_engine, per_client_params=True)
            if on_device:
                own = jit(own_sums).lower(state.personal, test_data).compile()
                self._personal = lambda st: finish_evaluate(own(st.personal, test_data))
            else:              # the personal models live on the host, with the population
                blocked_own = storage.blocked_evaluate(own_sums, finish_evaluate, test, put,
                                                       per_client_params=True)
                self._personal = lambda st: blocked_own(st.personal)

    def metrics(self, state) -> dict:
        ev = {k: float(v) for k, v in self._on_test(state).items()}
        if self._on_train is not None:
            on_train = self._on_train(state)
            ev.update({f"eval_train_{k}": float(on_train[f"eval_{k}"])
                       for k in ("loss", "accuracy")})
        if self._personal is not None:
            ev.update({f"eval_personal_{k[5:]}": float(v)
                       for k, v in self._personal(state).items()})
        return ev
