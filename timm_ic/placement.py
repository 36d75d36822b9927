"""The placement spec: where norm, activation and dropout sit around each weight layer.

A network is a sequence of *units*, one per weight layer: the unit's `order` puts the four slots
`norm`, `act`, `drop`, `conv` in sequence. `conv` opens the unit (post-activation, He et al. 2015 and
timm's ResNet: conv-BN-ReLU) or closes it (pre-activation, He et al. 2016: BN-ReLU-conv). The `drop`
slot holds a dropout only in the units that `drop_units` selects; the head has its own Bernoulli dropout,
before or after global pooling (`head`, `head_rate`; timm's `drop_rate` sets `head_rate`).

String form: `<preset>[:key=value,...]`, listing only the fields that differ from the preset, with
`order` written as slots joined by '-' (`ic:drop=uout,beta=0.1`, `post:order=conv-drop-norm-act`).
`str(p)` picks the preset that needs the fewest keys, so equal specs always print alike and
`Placement.parse(str(p)) == p`.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from .layers.dropout import DROP_KINDS, check_beta, check_drop_rate
from .layers.norm import CONV_KINDS, DEFAULT_MAX_GROUPS, GROUPED_NORMS, NORM_KINDS

__all__ = ['Placement', 'PRESETS', 'PRESET_DOCS']

SLOTS = ('norm', 'act', 'drop', 'conv')
DROP_UNITS = ('all', 'last', 'before_last', 'none')
HEAD_DROPS = ('before_pool', 'after_pool', 'none')


@dataclass(frozen=True)
class Placement:
    """Declarative norm / activation / dropout placement; see the module docstring and `PRESETS`.

    Attributes:
        order: the four slots of a unit, `conv` first (post-activation) or last (pre-activation).
        norm: normalizer kind (`timm_ic.layers.NORM_KINDS`); groups / group_size for grouped norms.
        conv: weight layer kind, 'conv' or 'ws' (scaled weight standardization).
        act: activation name understood by `timm.layers.get_act_layer`.
        drop: dropout kind in the drop slot: 'dropout' (Bernoulli, `drop_rate`), 'uout' (`beta`), 'none'.
        drop_units: units of each residual branch / dense layer that get the dropout: 'all', 'last',
            'before_last' or 'none'. 'last' is the branch's last unit: before its conv in a pre-activation
            order, after its norm and before the residual sum in a post-activation one. 'before_last' is the
            unit whose drop slot comes right before the branch's last weight layer (Kim et al.'s rule): the
            last unit in a pre-activation order, the one before it in a post-activation order
            (conv-BN-ReLU-Dropout-conv-BN, then the sum); a post-activation branch of one weight layer gets none.
            With 'all', transitions between dense blocks get it too.
        head: where the head's Bernoulli dropout goes: 'before_pool', 'after_pool' or 'none'.
        head_rate: the head's drop rate.
    """
    order: Tuple[str, ...] = ('conv', 'norm', 'act', 'drop')
    norm: str = 'batchnorm'
    groups: Optional[int] = None
    group_size: Optional[int] = None
    conv: str = 'conv'
    act: str = 'relu'
    drop: str = 'none'
    drop_rate: float = 0.0
    beta: float = 0.0
    drop_units: str = 'all'
    head: str = 'after_pool'
    head_rate: float = 0.0

    def __post_init__(self):
        order = tuple(self.order.split('-')) if isinstance(self.order, str) else tuple(self.order)
        object.__setattr__(self, 'order', order)
        if sorted(order) != sorted(SLOTS):
            raise ValueError(f'order must hold each of {list(SLOTS)} once (e.g. act-norm-drop-conv), got {order}')
        if order[0] != 'conv' and order[-1] != 'conv':
            raise ValueError(
                f'conv must open (post-activation) or close (pre-activation) the unit, got {"-".join(order)}')
        if self.norm not in NORM_KINDS:
            raise ValueError(f'unknown norm {self.norm!r}; valid: {sorted(NORM_KINDS)}')
        if (self.groups is not None or self.group_size is not None) and self.norm not in GROUPED_NORMS:
            raise ValueError(f'norm {self.norm!r} takes no groups; grouped norms: {sorted(GROUPED_NORMS)}')
        if self.groups is not None and self.group_size is not None:
            raise ValueError('give either groups or group_size, not both')
        if self.conv not in CONV_KINDS:
            raise ValueError(f'unknown conv kind {self.conv!r}; valid: {list(CONV_KINDS)}')
        if self.drop not in DROP_KINDS:
            raise ValueError(f'unknown drop kind {self.drop!r}; valid: {list(DROP_KINDS)}')
        if self.drop_units not in DROP_UNITS:
            raise ValueError(f'unknown drop_units {self.drop_units!r}; valid: {list(DROP_UNITS)}')
        if self.head not in HEAD_DROPS:
            raise ValueError(f'unknown head dropout position {self.head!r}; valid: {list(HEAD_DROPS)}')
        object.__setattr__(self, 'drop_rate', check_drop_rate(self.drop_rate))
        object.__setattr__(self, 'beta', check_beta(self.beta))
        object.__setattr__(self, 'head_rate', check_drop_rate(self.head_rate))
        from timm.layers import get_act_layer
        try:
            get_act_layer(self.act)
        except KeyError:  # timm's own error lists nothing
            from timm.layers.create_act import _ACT_LAYER_DEFAULT
            raise ValueError(f'unknown act {self.act!r}; valid: {sorted(_ACT_LAYER_DEFAULT)}') from None

    # --- derived views the builders use
    @property
    def preact(self) -> bool:
        """True when conv closes the unit: the branch input is the raw sum, as in a pre-activation ResNet."""
        return self.order[-1] == 'conv'

    @property
    def pre_slots(self) -> Tuple[str, ...]:
        return self.order[:self.order.index('conv')]

    @property
    def post_slots(self) -> Tuple[str, ...]:
        return self.order[self.order.index('conv') + 1:]

    @property
    def has_drop(self) -> bool:
        return self.drop_units != 'none' and (
            (self.drop == 'dropout' and self.drop_rate > 0) or (self.drop == 'uout' and self.beta > 0))

    def drop_in_unit(self, index: int, num_units: int) -> bool:
        """Whether unit `index` of a branch of `num_units` units gets the dropout."""
        if not self.has_drop:
            return False
        if self.drop_units == 'all':
            return True
        if self.drop_units == 'before_last' and not self.preact:  # post: the unit feeding the last conv
            return index == num_units - 2
        return index == num_units - 1

    # --- construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> 'Placement':
        """A named preset (`PRESETS`), with any field overridden: `Placement.preset('ic', drop='uout', beta=0.1)`."""
        if name not in PRESETS:
            raise ValueError(f'unknown placement preset {name!r}; valid: {list(PRESETS)}')
        unknown = set(overrides) - _FIELD_NAMES
        if unknown:
            raise ValueError(f'unknown placement keys {sorted(unknown)}; valid: {sorted(_FIELD_NAMES)}')
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def parse(cls, spec: Union[str, 'Placement']) -> 'Placement':
        """Parse the string form `<preset>[:key=value,...]`; a Placement is returned as it is."""
        if isinstance(spec, Placement):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f'a placement is a Placement or its string form, got {type(spec).__name__}')
        name, _, rest = spec.strip().partition(':')
        overrides = {}
        for item in filter(None, (s.strip() for s in rest.split(','))):
            key, sep, value = item.partition('=')
            if not sep:
                raise ValueError(f'placement item {item!r} is not key=value (in {spec!r})')
            if key not in _FIELD_NAMES:
                raise ValueError(f'unknown placement key {key!r}; valid: {sorted(_FIELD_NAMES)}')
            overrides[key] = _parse_value(key, value)
        return cls.preset(name, **overrides)

    def replace(self, **changes: Any) -> 'Placement':
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['order'] = '-'.join(self.order)
        return d

    def __str__(self) -> str:
        best = None
        for name, base in PRESETS.items():
            diff = [f'{f}={_format_value(getattr(self, f))}' for f in _FIELD_ORDER if getattr(self, f) != getattr(base, f)]
            if best is None or len(diff) < len(best[1]):
                best = (name, diff)
        name, diff = best
        return name + (':' + ','.join(diff) if diff else '')

    def describe(self) -> str:
        """The placement in words, for model cards and logs."""
        unit = '-'.join(s.replace('conv', 'weight') for s in self.order)
        if self.has_drop:
            kind = f'Bernoulli dropout p={self.drop_rate:g}' if self.drop == 'dropout' else f'Uout beta={self.beta:g}'
            where = {'all': 'in every unit', 'last': 'in the last unit of each branch',
                     'before_last': 'before the last weight layer of each branch'}[self.drop_units]
            drops = f'{kind} {where}'
        else:
            drops = 'no dropout inside blocks'
        head = 'no head dropout' if self.head == 'none' or not self.head_rate else \
            f'head dropout p={self.head_rate:g} {self.head.replace("_", " ")}'
        style = 'pre-activation' if self.preact else 'post-activation'
        return f'{style} units {unit}, {self._describe_norm()}, {drops}, {head}'

    def _describe_norm(self) -> str:
        if self.norm not in GROUPED_NORMS:
            return self.norm
        if self.groups is not None:
            return f'{self.norm} with {self.groups} groups'
        if self.group_size is not None:
            return f'{self.norm} with group size {self.group_size}'
        # the default of timm_ic.layers.resolve_groups, whose group size depends on the width
        return (f'{self.norm} with up to {DEFAULT_MAX_GROUPS} groups (the largest divisor of each width: '
                f'group size 1, InstanceNorm, on widths up to {DEFAULT_MAX_GROUPS})')


_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(Placement))
_FIELD_NAMES = frozenset(_FIELD_ORDER)
_INT_FIELDS = {'groups', 'group_size'}
_FLOAT_FIELDS = {'drop_rate', 'beta', 'head_rate'}


def _parse_value(key: str, value: str) -> Any:
    value = value.strip()
    if key == 'order':
        return tuple(value.split('-'))
    if key in _INT_FIELDS:
        if value == 'None':
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f'placement {key} must be an integer, got {value!r}') from None
    if key in _FLOAT_FIELDS:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f'placement {key} must be a number, got {value!r}') from None
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return '-'.join(value)
    return repr(value) if isinstance(value, float) else str(value)


PRESETS: Dict[str, Placement] = {
    # timm's ResNet and He et al. 2015: conv-BN-ReLU, the last ReLU after the residual sum
    'post': Placement(order=('conv', 'norm', 'act', 'drop')),
    # He et al. 2016 identity mappings: BN-ReLU-conv, the skip carries conv outputs
    'pre': Placement(order=('norm', 'act', 'drop', 'conv')),
    # Chen et al. 2019: ReLU-BN-Dropout-conv before every weight layer but the stem conv (IC layer = BN + Dropout);
    # 0.05 is the small rate seen in secondary notes, the paper's exact rates are not known here
    'ic': Placement(order=('act', 'norm', 'drop', 'conv'), drop='dropout', drop_rate=0.05,
                    head='after_pool', head_rate=0.05),
    # Kim et al. 2023: one dropout per branch after its last BN(+ReLU), right before its last conv; head dropout
    # before global pooling. Pre-activation here; 'kim:order=conv-norm-act-drop' keeps a post-activation
    # network's order with the dropout in the same place. The rates are our defaults: the paper's are not known
    'kim': Placement(order=('norm', 'act', 'drop', 'conv'), drop='dropout', drop_rate=0.1, drop_units='before_last',
                     head='before_pool', head_rate=0.1),
    # Li et al. 2019 remedy (1): no dropout inside blocks, dropout only after the last BN, before the classifier
    'after_bn': Placement(order=('conv', 'norm', 'act', 'drop'), head='after_pool', head_rate=0.2),
    # Li et al. 2019 harmful case, kept for ablations and diagnostics: dropout right before each block's last BN
    'before_bn': Placement(order=('conv', 'drop', 'norm', 'act'), drop='dropout', drop_rate=0.5, drop_units='last',
                           head='none'),
}
PRESET_DOCS = {
    'post': 'conv-BN-ReLU (timm ResNet; He et al. 2015; Ioffe & Szegedy 2015 put BN before the nonlinearity)',
    'pre': 'BN-ReLU-conv pre-activation (He et al. 2016); the baseline of Kim et al. 2023',
    'ic': 'ReLU-BN-Dropout-conv before every weight layer but the stem conv (Chen et al. 2019, arXiv 1905.05928)',
    'kim': 'one dropout after the last BN before the last conv of each branch, head dropout before pooling '
           '(Kim et al. 2023, arXiv 2302.06112); kim:order=conv-norm-act-drop for post-activation blocks',
    'after_bn': 'dropout only after all BN layers, before the classifier (Li et al. 2019, arXiv 1801.05134)',
    'before_bn': 'dropout right before the last BN of each block: the variance-shift case of Li et al. 2019',
}
