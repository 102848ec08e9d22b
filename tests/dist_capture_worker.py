"""Run under torchrun by tests/test_calibrate_dist.py: data-parallel capture, rank 0 saves the result."""

from __future__ import annotations

import sys

import torch


def model_and_inputs():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    inputs = [torch.randn(5 + i, 16, generator=g) * (1 + i) for i in range(7)]  # unequal shares: 4 and 3 items
    return model, inputs


def flat(stats) -> dict[str, torch.Tensor]:
    out = {}
    for key, st in stats.items():
        out.update({f"{key}.hessian": st.hessian, f"{key}.absmax": st.input_absmax, f"{key}.mean": st.input_mean,
                    f"{key}.samples": torch.tensor(st.samples)})
        for gs, a in st.w8a8.items():
            for field in ("hessian", "cross", "err_sq", "err_x", "err_mean"):
                out[f"{key}.w8a8_{gs}.{field}"] = getattr(a, field)
    return out


def main(path: str) -> None:
    import torch.distributed as dist

    from cq.calibrate_dist import capture_distributed
    from cq.io import write_safetensors

    dist.init_process_group("gloo")
    model, inputs = model_and_inputs()
    stats = capture_distributed(model, inputs, w8a8=["none", 16])
    if dist.get_rank() == 0:
        write_safetensors(path, flat(stats))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
