"""JSON layouts (spec §2.3): accepted forms, errors that name the JSON path, building from the configuration."""

from __future__ import annotations

import json

import pytest
from derecho_allocators import DefaultSubgroupAllocator, LayoutError, parse_json_layout

from derecho_core import Conf, ConfigError, Mode, PluginNotFoundError, SubgroupInfo, View


def sub(**fields):
    entry = {"min_nodes_by_shard": ["1"], "max_nodes_by_shard": ["2"]}
    entry.update(fields)
    return entry


def doc(*subgroups_per_type):
    return json.dumps([{"type_alias": f"T{i}", "layout": list(s)} for i, s in enumerate(subgroups_per_type)])


def test_sizes_as_strings_or_integers_and_defaults():
    (p,), aliases = parse_json_layout(doc([sub(min_nodes_by_shard=[2, "1"], max_nodes_by_shard=["3", 4])]))
    sp = p.shard_policy(0)
    assert aliases == ["T0"]
    assert (p.num_subgroups, p.identical_subgroups) == (1, False)
    assert (sp.min_num_nodes_by_shard, sp.max_num_nodes_by_shard) == ((2, 1), (3, 4))
    assert sp.modes_by_shard == (Mode.ORDERED, Mode.ORDERED) and sp.profiles_by_shard == ("DEFAULT", "DEFAULT")


def test_modes_profiles_reserved_and_senders():
    (p,), _ = parse_json_layout(doc([sub(min_nodes_by_shard=["1", "1"], max_nodes_by_shard=["2", "2"],
                                         delivery_modes_by_shard=["Raw", "ordered"], profiles_by_shard=["vcs", "Big"],
                                         reserved_node_ids_by_shard=[["*1", "2", 3], []])]))
    sp = p.shard_policy(0)
    assert sp.modes_by_shard == (Mode.UNORDERED, Mode.ORDERED) and sp.profiles_by_shard == ("VCS", "BIG")
    assert sp.reserved_node_ids_by_shard == (frozenset({1, 2, 3}), frozenset())
    assert sp.reserved_sender_ids_by_shard == (frozenset({1}), frozenset())


@pytest.mark.parametrize("layout, path, message", [
    (doc([sub(), sub(min_nodes_by_shard=["1", "1", "x"], max_nodes_by_shard=["1", "1", "1"])]),
     "layout[0].layout[1].min_nodes_by_shard[2]", 'expected a non-negative integer .* got "x"'),
    (doc([sub(max_nodes_by_shard=[-1])]), "layout[0].layout[0].max_nodes_by_shard[0]", "got -1"),
    (doc([sub()], [sub(min_nodes_by_shard=["3"], max_nodes_by_shard=["2"])]),
     "layout[1].layout[0].max_nodes_by_shard[0]", "maximum 2 is below the minimum 3"),
    (doc([sub(max_nodes_by_shard=["2", "2"])]), "layout[0].layout[0].max_nodes_by_shard",
     "has 2 entries but min_nodes_by_shard has 1"),
    (doc([sub(delivery_modes_by_shard=["Orderd"])]), "layout[0].layout[0].delivery_modes_by_shard[0]",
     'expected "Ordered" or "Raw"'),
    (doc([sub(profiles_by_shard=[""])]), "layout[0].layout[0].profiles_by_shard[0]", "expected a profile name"),
    (doc([sub(reserved_nodes_by_shard=[["1"]])]), "layout[0].layout[0].reserved_nodes_by_shard",
     "did you mean 'reserved_node_ids_by_shard'"),
    (doc([sub(reserved_node_ids_by_shard=[["1", "*x"]])]), "layout[0].layout[0].reserved_node_ids_by_shard[0][1]",
     'expected a node id such as "3", or "\\*3"'),
    (doc([sub(reserved_node_ids_by_shard=[["1", "*1"]])]), "layout[0].layout[0].reserved_node_ids_by_shard[0][1]",
     "node 1 is listed twice"),
    # shards 0 and 1 of three share node 5: Derecho compared only shard 0 with the last shard
    (doc([sub(min_nodes_by_shard=[1, 1, 1], max_nodes_by_shard=[1, 1, 1],
              reserved_node_ids_by_shard=[["5"], ["*5"], ["6"]])]),
     "layout[0].layout[0].reserved_node_ids_by_shard[1]", r"shards 0 and 1 of one subgroup both reserve node\(s\) \[5\]"),
    (doc([sub(min_nodes_by_shard=[], max_nodes_by_shard=[])]), "layout[0].layout[0].min_nodes_by_shard",
     "at least one shard"),
    (doc([{"max_nodes_by_shard": ["1"]}]), "layout[0].layout[0]", "missing 'min_nodes_by_shard'"),
    (doc(["not an object"]), "layout[0].layout[0]", "got a string"),
    (json.dumps([{"type_alias": "Foo"}]), "layout[0]", 'missing "layout"'),
    (json.dumps([{"layout": {}}]), "layout[0].layout", "expected an array, got an object"),
    (json.dumps({"layout": []}), "layout", "expected an array, got an object"),
    ('[{"layout": [', "layout", "not valid JSON"),
])
def test_errors_name_the_json_path(layout, path, message):
    with pytest.raises(LayoutError, match=message) as info:
        parse_json_layout(layout, source="derecho.cfg")
    assert info.value.path == path
    assert str(info.value).startswith(f"derecho.cfg: {path}: ")
    assert isinstance(info.value, ConfigError)


def test_type_count_must_match():
    with pytest.raises(LayoutError, match="the layout has 1 entries but there are 2 subgroup types"):
        DefaultSubgroupAllocator.from_json(["A", "B"], doc([sub()]))
    positional = DefaultSubgroupAllocator.from_json(None, doc([sub()]))
    assert positional.types == ["T0"]
    with pytest.raises(LayoutError, match="the layout has 1 entries but the group has 2"):
        positional(["A", "B"], None, View(0, range(3)))


def test_from_conf_inline_and_file(tmp_path):
    text = doc([sub(min_nodes_by_shard=["2"], max_nodes_by_shard=["2"])])
    inline = SubgroupInfo.from_conf(Conf.load(overrides={"LAYOUT/json_layout": text}))
    assert inline.name == "default" and inline.types == ["T0"]
    v = View(0, range(3))
    inline.allocate(["Anything"], None, v)
    assert v.subgroup_members("Anything") == [[0, 1]]

    (tmp_path / "layout.json").write_text(text)
    cfg = tmp_path / "derecho.cfg"
    cfg.write_text("[LAYOUT]\nallocator = default\njson_layout_file = layout.json\n")
    from_file = SubgroupInfo.from_conf(Conf.load(config_file=cfg))
    w = View(0, range(3))
    from_file.allocate(["X"], None, w)
    assert w.subgroup_members("X") == [[0, 1]]


def test_from_conf_errors():
    with pytest.raises(LayoutError, match="needs a layout"):
        SubgroupInfo.from_conf(Conf.load(overrides={}))
    with pytest.raises(LayoutError, match=r"\[LAYOUT\] json_layout: layout\[0\].layout\[0\].min_nodes_by_shard\[0\]"):
        SubgroupInfo.from_conf(Conf.load(overrides={"LAYOUT/json_layout": doc([sub(min_nodes_by_shard=["-"])])}))
    with pytest.raises(PluginNotFoundError, match="no allocator 'nope'"):
        SubgroupInfo.from_conf(Conf.load(overrides={"LAYOUT/allocator": "nope"}))


def test_derecho_sample_layout_and_one_line_example():
    # spec §2.3's one-line example (two types overlapping through reserved ids)
    text = ('[{"type_alias":"Foo","layout":[{"min_nodes_by_shard":["2"],"max_nodes_by_shard":["3"],'
            '"reserved_node_ids_by_shard":[["*1","2","3"]],"delivery_modes_by_shard":["Ordered"],'
            '"profiles_by_shard":["DEFAULT"]}]},'
            '{"type_alias":"Bar","layout":[{"min_nodes_by_shard":["2"],"max_nodes_by_shard":["3"],'
            '"reserved_node_ids_by_shard":[["2","3","4"]],"delivery_modes_by_shard":["Ordered"],'
            '"profiles_by_shard":["DEFAULT"]}]}]')
    alloc = DefaultSubgroupAllocator.from_json(None, text)
    assert alloc.types == ["Foo", "Bar"] and alloc.all_reserved_node_ids == frozenset({1, 2, 3, 4})
    v = View(0, range(5))
    SubgroupInfo(alloc).allocate(["Foo", "Bar"], None, v)
    assert v.subgroup_members("Foo") == [[1, 2, 3]] and v.subgroup_members("Bar") == [[2, 3, 4]]
    assert v.shard_views("Foo")[0].senders == [1]
    assert v.next_unassigned_rank == 5  # node 0 idle below the pointer: reserved ids sit at higher ranks
