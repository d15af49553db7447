"""torch's own functions, bound when torchbp is imported: the calls torchbp hands to
native (sparse and strided nested inputs, in-place calls autograd does not record) and
the native kernels its Functions compute with. A user who patches
``torch.nn.functional.<name>`` (or ``torch.sigmoid`` / ``torch.tanh``) with torchbp's
function after ``import torchbp`` (a drop-in, as kernel libraries patch theirs) would
otherwise make such a call torchbp's again: a RecursionError, or a whole torchbp Function
(which ``torch.compile`` cannot trace inside a backward) where a kernel was meant."""

import torch
import torch.nn.functional as F

sigmoid = torch.sigmoid
tanh = torch.tanh
relu = F.relu
leaky_relu = F.leaky_relu
leaky_relu_ = F.leaky_relu_
gelu = F.gelu
silu = F.silu
elu = F.elu
elu_ = F.elu_
softplus = F.softplus
softmax = F.softmax
softmin = F.softmin
log_softmax = F.log_softmax
linear = F.linear
nll_loss = F.nll_loss
cross_entropy = F.cross_entropy
