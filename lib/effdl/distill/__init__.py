"""Dataset distillation: random/herding baselines, gradient matching (DC), distribution matching
(DM), characteristic-function matching with Gaussian frequencies and NCFM's minmax.

    from effdl.distill import distill, evaluate
    x_syn, y_syn = distill(x, y, "ncfm", ipc=1, iterations=200, seed=0)
    acc = evaluate(x_syn, y_syn, x_test, y_test, seed=0)
"""

from effdl.distill.api import METHODS, distill, evaluate
from effdl.distill.cf import cf_discrepancy, cf_terms, empirical_cf, gaussian_frequencies, gaussian_mmd2, paired_cf
from effdl.distill.convnet import ConvNet, make_net
from effdl.distill.dm import mean_embedding_mmd
from effdl.distill.ncfm import FrequencySampler, cancelled_sampler_step, grad_norm, sampler_ascent_step

__all__ = ["METHODS", "distill", "evaluate", "cf_discrepancy", "cf_terms", "empirical_cf", "paired_cf",
           "gaussian_frequencies", "gaussian_mmd2", "ConvNet", "make_net", "mean_embedding_mmd",
           "FrequencySampler", "sampler_ascent_step", "cancelled_sampler_step", "grad_norm"]
