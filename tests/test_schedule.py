"""Scale schedules, token offsets and RoPE-2D positions against golden schedule.json / rope.safetensors."""
from __future__ import annotations

import pytest
import torch

from conftest import golden, golden_json
from nsarm_nodes.schedule import (
    BUCKET_LENGTHS,
    H_DIV_W_TEMPLATES,
    SCALES_1M,
    nearest_template,
    output_pixels,
    rope_cos_sin,
    rope_inv_freq,
    rope_positions,
    scale_schedule,
    token_counts,
    token_offsets,
    vae_scales,
)

HEAD_DIM = 128  # Infinity-8B / the golden tiny model
ROPE_TOL = dict(atol=1e-6, rtol=0)
# h/w templates of upstream's dynamic-resolution table (nsarm_spec.md section 3.10).
TEMPLATES = (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333)
# 1M output sizes (height, width) of the tall templates (nsarm_spec.md section 3.10).
PIXELS_1M = {1.0: (1024, 1024), 1.25: (1120, 896), 1.333: (1152, 864), 1.5: (1248, 832),
             1.75: (1344, 768), 2.0: (1440, 720), 2.5: (1600, 640), 3.0: (1776, 592)}


@pytest.fixture(scope="module")
def sched_json() -> dict:
    return golden_json("schedule.json")


def test_square_1m_schedule_matches_golden(sched_json):
    schedule = scale_schedule(sched_json["h_div_w"], sched_json["pn"])
    assert [(1, h, w) for h, w in schedule] == [tuple(s) for s in sched_json["scales_thw"]]
    assert [(1, h, w) for h, w in vae_scales(schedule)] == [tuple(s) for s in sched_json["vae_scales_thw"]]
    assert token_counts(schedule) == sched_json["tokens_per_scale"]
    assert token_offsets(schedule) == sched_json["token_offsets"]
    assert sum(token_counts(schedule)) == sched_json["total_tokens"] == 10521
    assert sum(token_counts(schedule)[: sched_json["replaced_scales"]]) == 521
    assert list(output_pixels(schedule)) == sched_json["pixel"]
    assert [2 * h for h, _ in schedule[: sched_json["replaced_scales"]]] == sched_json["map_output_sizes"]
    assert vae_scales(schedule, patchify=False) == schedule


def test_rope_positions_match_golden_per_scale(sched_json):
    schedule = scale_schedule()
    rows, cols = rope_positions(schedule)
    assert rows.shape == cols.shape == (sched_json["total_tokens"],)
    assert sched_json["rope"]["grid_last_scale"] == list(schedule[-1])
    for entry in sched_json["rope"]["per_scale"]:
        h, w, off = entry["h"], entry["w"], entry["offset"]
        assert (h, w) == schedule[entry["scale"]] and off == token_offsets(schedule)[entry["scale"]]
        grid_rows = rows[off:off + h * w].reshape(h, w)
        grid_cols = cols[off:off + h * w].reshape(h, w)
        # Row position depends only on the token row, column position only on the token column.
        assert torch.equal(grid_rows, grid_rows[:, :1].expand(h, w))
        assert torch.equal(grid_cols, grid_cols[:1, :].expand(h, w))
        assert grid_rows[:, 0].tolist() == entry["row_positions"], f"scale {entry['scale']}"
        assert grid_cols[0, :].tolist() == entry["col_positions"], f"scale {entry['scale']}"


def test_rope_cache_matches_golden(sched_json):
    g = golden("rope")
    rope = sched_json["rope"]
    assert (rope["head_dim"], rope["pairs"], rope["freqs_per_axis"]) == (HEAD_DIM, 64, 32)
    inv_freq = rope_inv_freq(HEAD_DIM, rope["base"])
    assert inv_freq.shape == (rope["freqs_per_axis"],)
    torch.testing.assert_close(inv_freq, g["inv_freq"], **ROPE_TOL)
    schedule = scale_schedule()
    rows, cols = rope_positions(schedule)
    idx = g["token_index"]
    assert torch.equal(rows[idx], g["pos_row"]) and torch.equal(cols[idx], g["pos_col"])
    cos, sin = rope_cos_sin(schedule, HEAD_DIM, rope["base"])
    assert cos.shape == sin.shape == (sched_json["total_tokens"], rope["pairs"])
    torch.testing.assert_close(cos[idx], g["cos"], **ROPE_TOL)
    torch.testing.assert_close(sin[idx], g["sin"], **ROPE_TOL)


def test_templates_and_buckets():
    assert sorted(H_DIV_W_TEMPLATES) == sorted(TEMPLATES)
    assert BUCKET_LENGTHS == {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
    for t in H_DIV_W_TEMPLATES:
        assert nearest_template(t) == t
        full = scale_schedule(t, "1M")
        assert len(full) == 13 and full == list(SCALES_1M[t])
        assert full[0] == (1, 1)
        # Coarse to fine along both axes.
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(full, full[1:]))
        for pn, n in BUCKET_LENGTHS.items():
            assert scale_schedule(t, pn) == full[:n]
    for tall, pixels in PIXELS_1M.items():
        assert output_pixels(scale_schedule(tall)) == pixels
    with pytest.raises(ValueError):
        scale_schedule(1.0, "2M")


@pytest.mark.parametrize("tall", [t for t in TEMPLATES if t > 1])
def test_wide_templates_are_transposes(tall):
    wide = nearest_template(1 / tall)
    assert wide < 1 and wide in TEMPLATES
    assert SCALES_1M[wide] == tuple((w, h) for h, w in SCALES_1M[tall])


def test_nearest_template_of_odd_ratios():
    assert nearest_template(1.02) == 1.0
    assert nearest_template(1.27) == 1.25
    assert nearest_template(0.52) == 0.5
    assert nearest_template(10.0) == 3.0


def test_rope_positions_of_a_non_square_schedule():
    schedule = scale_schedule(2.0)  # last scale 90 x 45 tokens
    last_h, last_w = schedule[-1]
    rows, cols = rope_positions(schedule)
    offsets = token_offsets(schedule)
    for (h, w), off in zip(schedule, offsets):
        grid_rows = rows[off:off + h * w].reshape(h, w)[:, 0]
        grid_cols = cols[off:off + h * w].reshape(h, w)[0, :]
        expect_rows = [round(i * last_h / h) for i in range(h)]
        expect_cols = [round(j * last_w / w) for j in range(w)]
        assert grid_rows.tolist() == expect_rows and grid_cols.tolist() == expect_cols
    # The last scale sits on the full grid.
    assert rows[offsets[-1]:].reshape(last_h, last_w)[:, 0].tolist() == list(range(last_h))
