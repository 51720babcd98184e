"""`alpro shard`'s options: one typed dataclass (ShardOptions, nesting the encoder's VideoSettings) parsed by
alpro.config, with build.json's record of them unchanged. In-process: nothing here runs the sharder."""

import json
from pathlib import Path

import pytest

from alpro.cli import guarded
from alpro.config import ConfigError, command_parser, from_dict, parse_command
from alpro.sharding.media import VideoSettings
from alpro.sharding.shard import DEFAULT_GOP, ShardCommand, ShardOptions, main

# build.json's "options" for `--shard-size 3 --codec vp9 --gop 4 --fps 12 --short-side 64 --media video
# --max-duration 1.5 --shard-bytes 0`, as written by the sharder before ShardOptions nested VideoSettings (commit
# f4ecdb7): the keys, their order and the values are part of the byte-identical output.
RECORDED = ('{"format": null, "media_root": null, "video_ext": ".mp4", "qa": [], "split": null, "media": "video", '
            '"limit": null, "name": "shard", "shard_size": 3, "shard_bytes": null, "absolute_paths": false, '
            '"codec": "vp9", "copy": false, "gop": 4, "fps": 12.0, "fps_scale": null, "short_side": 64, "crf": null, '
            '"preset": "veryfast", "max_duration": 1.5, "jpeg_quality": 90, "keep_duplicates": false, '
            '"max_source_bytes": 4294967296, "max_source_duration": 10800.0, "min_side": 16, "max_pixels": 33177600, '
            '"max_aspect": 10.0, "max_caption_chars": 2000, "num_nodes": 1}')
ARGV = ["m.jsonl", "out", "--shard-size", "3", "--codec", "vp9", "--gop", "4", "--fps", "12", "--short-side", "64",
        "--media", "video", "--max-duration", "1.5", "--shard-bytes", "0"]


def test_build_json_records_the_same_flat_options_in_the_same_order():
    cmd = parse_command(ShardCommand, ARGV, prog="alpro shard")
    assert json.dumps(cmd.options.output_options()) == RECORDED
    # the library spelling (flat keywords, as shard_manifest takes them) is the same options
    same = from_dict(ShardOptions, {"shard_size": 3, "codec": "vp9", "gop": 4, "fps": 12, "short_side": 64,
                                    "media": "video", "max_duration": 1.5, "shard_bytes": None})
    assert same == cmd.options


def test_video_settings_are_nested_once_with_the_sharders_defaults():
    d = ShardOptions()
    assert d.video == VideoSettings(gop=DEFAULT_GOP) and not hasattr(d, "gop")
    # one flat key keeps the sharder's other defaults (GOP 6, not VideoSettings' own 8)
    assert from_dict(ShardOptions, {"codec": "vp9"}).video == VideoSettings(codec="vp9", gop=DEFAULT_GOP)
    assert from_dict(ShardOptions, {"video": {"short_side": 128}, "gop": 3}).video == \
        VideoSettings(gop=3, short_side=128)


def test_command_line_flags_defaults_and_switches():
    cmd = parse_command(ShardCommand, ["m.jsonl", "out", "--qa", "a.jsonl", "--qa", "b.jsonl", "--no-progress",
                                       "--copy", "--keep-duplicates", "--workers", "2"], prog="alpro shard")
    assert (cmd.manifest, cmd.out_dir, cmd.merge_index) == ("m.jsonl", "out", None)
    o = cmd.options
    assert o.qa == [Path("a.jsonl"), Path("b.jsonl")] and not o.progress and o.copy and o.keep_duplicates
    assert o.workers == 2 and o.shard_bytes == 1 << 30 and o.video.gop == DEFAULT_GOP
    merge = parse_command(ShardCommand, ["--merge-index", "out"], prog="alpro shard")
    assert merge.merge_index == "out" and merge.manifest is None and merge.options == ShardOptions()


def test_help_lists_every_option_with_its_docstring_in_groups():
    parser = command_parser(ShardCommand, prog="alpro shard")
    flags = {s for a in parser._actions for s in a.option_strings}
    for name in ("--gop", "--codec", "--fps-scale", "--crf", "--preset", "--max-duration", "--copy",
                 "--jpeg-quality", "--shard-bytes", "--no-progress", "--max-reject-ratio", "--merge-index", "--qa"):
        assert name in flags, name
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    text = parser.format_help()
    for group in ("inputs:", "output:", "video and images:", "checks:", "execution (never changes the output bytes):"):
        assert f"\n{group}\n" in text, group
    assert "keyframe every GOP frames (default: 6)" in text


@pytest.mark.parametrize("argv, message", [
    (["--gop", "x"], "'gop' must be int, got 'x'"),
    (["--gop", "0"], "gop must be >= 1, got 0"),
    (["--codec", "av1"], "'codec' must be one of 'h264' | 'vp9', got 'av1'"),
    (["--fps", "10", "--fps-scale", "0.1"], "give either fps or fps_scale, not both"),
    (["--format", "xml"], "format must be one of"),
    (["--gopp", "3"], "unrecognized arguments: --gopp 3"),
])
def test_bad_values_are_one_line_errors_with_exit_2(tmp_path, capsys, argv, message):
    assert guarded("shard", main, [str(tmp_path / "m.jsonl"), str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alpro shard: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_library_errors_stay_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'gopp' \\(did you mean 'gop'\\?\\)"):
        from_dict(ShardOptions, {"gopp": 3})
