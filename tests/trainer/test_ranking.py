"""The one definition of "better": best epoch, Ray's checkpoint rank, patience."""

import math

from stoker.trainer.ranking import (
    Patience,
    Score,
    best_position,
    better,
    checkpoint_rank,
    gain,
    improves,
)


def test_equal_metric_lower_loss_wins_and_equal_both_keeps_the_earlier():
    assert better(Score(0.9, 0.3), Score(0.9, 0.4), "max")
    assert not better(Score(0.9, 0.4), Score(0.9, 0.3), "max")
    assert not better(Score(0.9, 0.3), Score(0.9, 0.3), "max")
    assert better(Score(0.91, 9.0), Score(0.9, 0.1), "max")  # the metric comes first
    assert better(Score(0.2, 0.5), Score(0.3, 0.1), "min")  # e.g. mse
    assert better(Score(0.2, 0.1), Score(0.2, 0.5), "min")
    assert not better(Score(math.nan, 0.1), Score(0.5, 0.5), "max")
    assert better(Score(math.nan, 0.1), None, "max")


def test_min_delta_needs_a_real_metric_gain():
    assert not better(Score(0.905, 0.1), Score(0.9, 0.5), "max", min_delta=0.01)
    assert better(Score(0.92, 0.9), Score(0.9, 0.5), "max", min_delta=0.01)
    assert not better(Score(0.9, 0.1), Score(0.9, 0.5), "max", min_delta=0.01)


def test_gain_is_signed_by_the_mode_and_improves_is_strict():
    assert gain(0.9, 0.8, "max") == gain(0.8, 0.9, "min") == 0.9 - 0.8
    assert gain(0.8, 0.9, "max") < 0 and math.isnan(gain(math.nan, 0.9, "min"))
    assert improves(0.5, None, "min") and improves(math.nan, None, "max")  # anything beats nothing
    assert improves(0.4, 0.5, "min") and not improves(0.5, 0.5, "min") and not improves(0.6, 0.5, "min")
    assert improves(0.6, 0.5, "max") and not improves(0.5, 0.5, "max")
    assert not improves(math.nan, 0.5, "max") and not improves(0.6, math.nan, "max")
    assert not improves(0.505, 0.5, "max", min_delta=0.01) and improves(0.52, 0.5, "max", min_delta=0.01)


def test_best_position_takes_the_first_of_equal_values_and_never_a_nan():
    assert best_position([0.3, 0.7, 0.7, 0.1], "max") == 1
    assert best_position([0.3, 0.1, 0.1, 0.7], "min") == 1
    assert best_position([math.nan, 0.2, math.nan, 0.5], "max") == 3
    assert best_position([math.nan, 0.2], "min") == 1
    assert best_position([], "max") is None and best_position([math.nan], "min") is None


def test_the_best_epoch_always_has_the_strictly_highest_checkpoint_rank():
    # A run's validations with ties on the metric: Ray must rank the loop's best first.
    scores = [Score(0.8, 0.9), Score(0.96, 0.5), Score(0.96, 0.6), Score(0.96, 0.3), Score(0.9, 0.2),
              Score(0.96, 0.3), Score(1.0, 0.4), Score(0.5, 2.0)]
    best, best_rank, ranks = None, None, []
    for epoch, score in enumerate(scores):
        improved = better(score, scores[best] if best is not None else None, "max")
        rank = checkpoint_rank(best_rank, improved)
        if improved:
            best, best_rank = epoch, rank
        ranks.append(rank)
        # What Ray's CheckpointConfig(score "max") keeps first: the highest rank so far.
        top = max(range(epoch + 1), key=lambda e: ranks[e])
        assert top == best and sorted(ranks).count(ranks[best]) == 1
    assert best == 6
    lexicographic = max(range(len(scores)), key=lambda e: (scores[e].metric, -scores[e].loss, -e))
    assert best == lexicographic


def test_patience_counts_validations_without_improvement_and_survives_a_checkpoint():
    patience = Patience(2, "max")
    assert patience.update(Score(0.5, 1.0)) and not patience.exhausted
    assert not patience.update(Score(0.5, 1.0)) and not patience.exhausted  # 1 without improvement
    restored = Patience(2, "max")
    restored.load_state_dict(patience.state_dict())
    assert not restored.update(Score(0.4, 0.1))
    assert restored.exhausted  # 2 in a row: stop
    assert restored.update(Score(0.5, 0.9)) and not restored.exhausted  # equal metric, lower loss
    old = Patience(1, "max")
    old.load_state_dict({"best": 0.7, "since": 0})  # a checkpoint written before the tie-break
    assert old.update(Score(0.7, 5.0))
