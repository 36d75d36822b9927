"""The Placement spec: presets, overrides, the string form and its errors."""
import dataclasses

import pytest

from timm_ic import PRESETS, Placement
from timm_ic.placement import PRESET_DOCS


@pytest.mark.parametrize('name', list(PRESETS))
def test_presets_round_trip_and_are_documented(name):
    p = Placement.preset(name)
    assert str(p) == name
    assert Placement.parse(str(p)) == p
    assert name in PRESET_DOCS
    words = p.describe()  # says the unit style and whether blocks drop, as the preset is
    assert words.startswith('pre-activation units ' if p.preact else 'post-activation units '), words
    assert ('no dropout inside blocks' in words) == (not p.has_drop), words


@pytest.mark.parametrize('spec', [
    dict(name='ic', drop='uout', beta=0.1),
    dict(name='post', order=('conv', 'drop', 'norm', 'act'), drop='dropout', drop_rate=0.25, drop_units='last'),
    dict(name='pre', norm='groupnorm', group_size=8, head='before_pool', head_rate=0.3),
    dict(name='kim', norm='evonorm_s0', groups=4, conv='ws', act='silu'),
    dict(name='after_bn', norm='none', head_rate=0.5),
])
def test_modified_presets_round_trip_exactly(spec):
    spec = dict(spec)
    p = Placement.preset(spec.pop('name'), **spec)
    text = str(p)
    assert Placement.parse(text) == p
    assert str(Placement.parse(text)) == text


def test_equal_specs_print_alike():
    p = Placement.parse('pre:drop=dropout,drop_rate=0.1,drop_units=before_last,head=before_pool,head_rate=0.1')
    assert p == PRESETS['kim'] and str(p) == 'kim'


def test_string_form_is_compact():
    assert str(Placement.preset('ic', drop='uout', beta=0.1)) == 'ic:drop=uout,beta=0.1'


def test_placement_is_immutable_and_hashable():
    p = Placement.preset('ic')
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.drop_rate = 0.5
    assert len({p, Placement.parse('ic')}) == 1


def test_derived_views():
    ic = Placement.preset('ic')
    assert ic.preact and ic.pre_slots == ('act', 'norm', 'drop') and ic.post_slots == ()
    post = Placement.preset('post')
    assert not post.preact and post.post_slots == ('norm', 'act', 'drop')
    kim = Placement.preset('kim')
    assert [kim.drop_in_unit(i, 3) for i in range(3)] == [False, False, True]
    assert not Placement.preset('post', drop='dropout').has_drop  # a rate of 0 is no dropout


@pytest.mark.parametrize('text, message', [
    ('icc', "valid: ['post', 'pre', 'ic', 'kim', 'after_bn', 'before_bn']"),
    ('ic:dropout=0.1', "unknown placement key 'dropout'; valid:"),
    ('ic:drop=gauss', "valid: ['dropout', 'uout', 'none']"),
    ('ic:norm=bn', 'batchnorm'),
    ('ic:drop_units=first', "valid: ['all', 'last', 'before_last', 'none']"),
    ('ic:head=middle', "valid: ['before_pool', 'after_pool', 'none']"),
    ('ic:drop_rate=1.5', 'drop_rate must be in [0, 1)'),
    ('ic:beta=-1', 'beta must be >= 0'),
    ('ic:drop_rate=lots', 'must be a number'),
    ('ic:order=norm-conv-act-drop', 'conv must open'),
    ('ic:order=norm-act-conv', 'order must hold each of'),
    ('ic:groups=4', 'takes no groups'),
    ('ic:act=relu7', 'unknown act'),
    ('ic:drop', 'is not key=value'),
])
def test_bad_specs_raise_value_errors_listing_valid_choices(text, message):
    with pytest.raises(ValueError) as e:
        Placement.parse(text)
    assert message in str(e.value)


def test_unknown_override_key_lists_fields():
    with pytest.raises(ValueError, match='valid: .*drop_rate'):
        Placement.preset('kim', rate=0.1)


def test_parse_passes_placements_through():
    p = Placement.preset('kim')
    assert Placement.parse(p) is p
    with pytest.raises(ValueError, match='string form'):
        Placement.parse(0.1)


def test_kim_before_last_round_trips_and_selects_the_unit_before_the_last_weight_layer():
    post = Placement.parse('kim:order=conv-norm-act-drop')
    assert str(post) == 'kim:order=conv-norm-act-drop' and Placement.parse(str(post)) == post
    assert post.drop_units == 'before_last' and not post.preact
    # post-activation: the unit whose drop slot (after its norm-act) feeds the last conv
    assert [post.drop_in_unit(i, 3) for i in range(3)] == [False, True, False]
    assert [post.drop_in_unit(i, 2) for i in range(2)] == [True, False]
    assert not post.drop_in_unit(0, 1)  # a single weight layer has nothing before it in its branch
    pre = Placement.preset('kim')  # pre-activation: the last unit's drop slot precedes its conv
    assert [pre.drop_in_unit(i, 2) for i in range(2)] == [False, True]
    assert 'before the last weight layer of each branch' in post.describe()


def test_describe_shows_the_groups_of_grouped_norms():
    assert 'groupnorm with group size 8' in Placement.preset('pre', norm='groupnorm', group_size=8).describe()
    assert 'evonorm_s0 with 4 groups' in Placement.preset('pre', norm='evonorm_s0', groups=4).describe()
    default = Placement.preset('pre', norm='groupnorm').describe()
    assert 'up to 32 groups' in default and 'group size 1' in default
    assert 'groups' not in Placement.preset('pre').describe()
