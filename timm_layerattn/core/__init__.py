"""The trunk-independent core: the unit contract and runner (`units`) and the strategy interface (`strategy`)."""
from .strategy import BlockSite, LayerStrategy, StageSite, Trunk, TrunkCfg
from .units import Dd, LAStage, Shared, State, checkpoint_unit

__all__ = ['State', 'Shared', 'Dd', 'LAStage', 'checkpoint_unit', 'BlockSite', 'StageSite', 'TrunkCfg', 'Trunk',
           'LayerStrategy']
