"""Registers the first-party loss balancers (entry point ``mtcore = balancers``)."""

from mtcore.plugin import BalancerSpec, hookimpl

from .cagrad import CAGrad
from .dwa import DWA, RLW
from .famo import FAMO
from .gradient import MGDA, PCGrad
from .gradnorm import GradNorm
from .nash_mtl import NashMTL
from .weighting import EqualWeighting, FixedWeighting, UncertaintyWeighting


@hookimpl
def mtcore_balancers():
    yield BalancerSpec("equal", EqualWeighting, "Every task weight 1: L = sum_k L_k.")
    yield BalancerSpec("fixed", FixedWeighting, "User-given constant weight per task.")
    yield BalancerSpec("uncertainty", UncertaintyWeighting,
                       "Learned homoscedastic-uncertainty weights (Kendall et al. 2018).")
    yield BalancerSpec("pcgrad", PCGrad, "Project conflicting task gradients (Yu et al. 2020).")
    yield BalancerSpec("mgda", MGDA, "Min-norm common descent direction (Sener & Koltun 2018).")
    yield BalancerSpec("dwa", DWA, "Weights from the losses' epoch-to-epoch change (Liu et al. 2019).")
    yield BalancerSpec("rlw", RLW, "Random loss weights each step (Lin et al. 2022).")
    yield BalancerSpec("gradnorm", GradNorm,
                       "Weights that equalise task gradient norms (Chen et al. 2018).")
    yield BalancerSpec("cagrad", CAGrad, "Conflict-averse gradient descent (Liu et al. 2021).")
    yield BalancerSpec("nash_mtl", NashMTL, "Nash bargaining over task gradients (Navon et al. 2022).")
    yield BalancerSpec("famo", FAMO, "Fast adaptive multitask optimization (Liu et al. 2023).")
