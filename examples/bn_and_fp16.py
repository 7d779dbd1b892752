"""BatchNorm statistics left alone in the second pass, and float16 with a scaler made for two backward passes."""

import torch
import torch.nn.functional as F
from _digits import digits

from ssam import SAM, TwoPassScaler, frozen_bn_stats

model, train_set, loader = digits()
device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# [readme]
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
scaler = TwoPassScaler()  # GradScaler allows one unscale per step; SAM needs two
for x, y in loader:
    x, y = x.to(device), y.to(device)
    with torch.autocast(device, torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if scaler.first_step(opt):  # unscale, perturb; False (and nothing moved) if pass one overflowed
        with frozen_bn_stats(model), torch.autocast(device, torch.float16):  # BN running stats counted once
            loss2 = F.cross_entropy(model(x), y)
        scaler.scale(loss2).backward()
        scaler.second_step(opt)  # unscale, restore w, step (skipped if pass two overflowed)
    scaler.update()
# [/readme]

print(f"scale {scaler.get_scale():g}, skipped steps {scaler.skipped_steps}")
