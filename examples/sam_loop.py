"""SAM around SGD in a plain loop: two forward/backward passes per step."""

import torch
import torch.nn.functional as F
from _digits import digits

from ssam import SAM

model, train_set, loader = digits()
epochs = 3

# [readme]
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3)
for epoch in range(epochs):
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()  # gradient at w
        opt.first_step(zero_grad=True)  # w -> w + e
        F.cross_entropy(model(x), y).backward()  # gradient at w + e
        opt.second_step(zero_grad=True)  # back to w, SGD step with that gradient
# [/readme]

print(f"final batch loss {F.cross_entropy(model(x), y).item():.3f}")
