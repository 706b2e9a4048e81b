"""The noise floor (megamora.noise) and the verdict judged against it: a paired difference counts only
when every seed's is beyond the floor, in one direction; the floor is the largest difference between
runs of one method and seed that differ only in float order."""

import pytest

from megamora.noise import NoiseFloor, beyond, measure, seed_spread, tag
from megamora.recipes import RecipeError, load_recipe
from megamora.report import summarize, verdict

from test_reproduce import result


def test_floor_is_the_largest_same_seed_difference():
    reference = {("lora", 0): (600.0, 6.0), ("relora", 0): (620.0, 10.0), ("mora", 1): (500.0, 80.0)}
    others = {"1 thread": {("lora", 0): (612.0, 6.3), ("relora", 0): (615.0, 10.0)},
              "2 ranks": {("lora", 0): (594.0, 6.0), ("full", 0): (1.0, None)}}
    floor = measure(reference, others)
    assert [(p.method, p.seed, p.setting) for p in floor.pairs] == [
        ("lora", 0, "1 thread"), ("relora", 0, "1 thread"), ("lora", 0, "2 ranks")]  # only pairs in both
    assert floor.perplexity == pytest.approx(12 / 600) and floor.singular_values == pytest.approx(0.05)
    assert measure(reference, {"x": {("full", 3): (1.0, None)}}) is None


def test_beyond_noise_needs_every_seed_beyond_the_floor_in_one_direction():
    assert beyond({0: 0.05, 1: 0.03, 2: 0.021}, 0.02)
    assert beyond({0: -0.05, 1: -0.03}, 0.02)
    assert not beyond({0: 0.05, 1: 0.019, 2: 0.04}, 0.02)  # one seed within the floor
    assert not beyond({0: 0.05, 1: -0.05}, 0.02)  # both beyond, opposite directions
    assert not beyond({}, 0.0)
    floor = NoiseFloor(0.02, None, "test")
    assert "**beyond noise**" in tag({0: 0.05, 1: 0.03}, floor)
    assert "*within noise* (smallest seed 1.00%, floor 2.00%)" in tag({0: 0.05, 1: 0.01}, floor)
    assert "not judged" in tag({0: 0.5}, floor, "singular_values")
    assert seed_spread({"a": {0: 90.0, 1: 110.0}, "b": {0: 5.0}}) == {"a": pytest.approx(2 ** 0.5 / 10)}


def rows(ppl: dict[str, tuple], sv: dict[str, float]):
    return [result(m, s, ppl[m][s], sv[m]) for m in ppl for s in range(len(ppl[m]))]


def test_verdict_calls_each_relation_beyond_or_within_noise():
    # MoRA 10% below LoRA on every seed; ReLoRA 1-3% below LoRA (the floor is 2%); ReMoRA below MoRA on
    # two seeds by 5%, above on one.
    res = rows({"lora": (600, 620, 640), "relora": (594, 601.4, 620.8), "mora": (540, 558, 576),
                "remora": (513, 530.1, 580)}, {"lora": 6, "relora": 10, "mora": 80, "remora": 120})
    summaries = {m: summarize(res, m) for m in ("lora", "mora", "relora", "remora")}
    v = verdict(summaries, res, NoiseFloor(0.02, 0.1, "test"))
    lines = {l.split(": ", 1)[1].split(" on ")[0]: l for l in v.ppl_lines if l.startswith("Paired by seed")}
    assert "**beyond noise**" in lines["MoRA lower than LoRA"]
    assert "*within noise* (smallest seed 1.00%, floor 2.00%)" in lines["ReLoRA lower than LoRA"]
    assert "*within noise*" in lines["ReMoRA lower than MoRA"]
    by_pair = {(p.lower, p.higher): p for p in v.pairs}
    assert by_pair[("mora", "lora")].beyond_noise is True and by_pair[("relora", "lora")].beyond_noise is False
    assert by_pair[("mora", "lora")].floor == 0.02
    assert ("against a 2.00% noise floor: 3 hold beyond noise on every seed, 0 are reversed beyond noise, "
            "2 are within noise") in v.ppl_lines[0]
    assert all("beyond noise" in l for l in v.sv_lines[1:])  # 80 vs 6 counts: far beyond a 10% floor
    # The same numbers with a floor above every difference: nothing is beyond noise.
    wide = verdict(summaries, res, NoiseFloor(0.2, 20.0, "test"))
    assert not any(p.beyond_noise for p in wide.pairs)
    assert "0 hold beyond noise on every seed, 0 are reversed beyond noise, 5 are within noise" in wide.ppl_lines[0]
    # ReLoRA 5% above LoRA on every seed: against the paper, beyond noise.
    for r in res:
        if r.method == "relora":
            r.perplexity = 1.05 * next(x.perplexity for x in res if x.method == "lora" and x.seed == r.seed)
    summaries = {m: summarize(res, m) for m in ("lora", "mora", "relora", "remora")}
    worse = verdict(summaries, res, NoiseFloor(0.02, 0.1, "test"))
    assert "1 are reversed beyond noise" in worse.ppl_lines[0]
    assert any(l.startswith("Paired by seed: ReLoRA higher than LoRA on 3/3 seeds, by 5.0%") and "**beyond noise**" in l
               for l in worse.ppl_lines)
    # No floor: the differences are described and the report says they are not judged.
    bare = verdict(summaries, res)
    assert all(p.beyond_noise is None for p in bare.pairs)
    assert "not judged against one" in bare.ppl_lines[0] and not any("noise*" in l for l in bare.ppl_lines[1:])


def test_a_recipe_records_its_floor(tmp_path):
    assert load_recipe("cpu").noise_floor["perplexity"] > 0  # measured: docs/results/cpu-recipe
    base = tmp_path / "base.yaml"
    base.write_text("steps: 4\n")
    for bad in ("noise_floor: 0.02", "noise_floor: {perplexity: 2}", "noise_floor: {singular_values: 0.1}",
                "noise_floor: {perplexity: 0.01, seeds: 3}"):
        (tmp_path / "r.yaml").write_text(f"base: [base.yaml]\nmethods: {{a: base.yaml}}\n{bad}\n")
        with pytest.raises(RecipeError, match="noise_floor"):
            load_recipe(tmp_path / "r.yaml")
