"""Where the numbers are computed: the device, the trainer's speed choices (precision, fused Adam, resident
data, cuDNN autotuning, compilation) decided in one place, and torchrun (one process per GPU).
A CPU run and a GPU run with the same choices differ only in the device."""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from plumbing import at_least

GPU_RESERVE_BYTES = 6 * 2 ** 30  # GPU memory left free beside resident data: model, activations


def resolve_device(name="auto"):  # 'auto': CUDA when available, else CPU; 'cuda' without a GPU: an error
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build")
    return torch.device(name)


def add_speed_flags(p):
    """trainer.py's speed flags: 'auto' (None) is decided per device; a named one runs on a CPU too."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto = cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16: the network under bfloat16 autocast (weights, loss and Adam stay fp32); fp32: "
                        "float32 (TF32 convolutions on CUDA); auto: bf16 on CUDA, else fp32 (default: auto)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="Adam's fused kernel, one for all parameters, on CUDA or CPU (default: on CUDA)")
    p.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                   help="hold all spectrograms as one tensor on the device (on a CPU: in RAM), so a batch is "
                        "an index, not read from the memory map (default: on CUDA when spectrograms.npy fits "
                        f"in free GPU memory with {GPU_RESERVE_BYTES / 2**30:.0f} GiB to spare)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="let cuDNN time its convolution algorithms for the fixed input shape and keep the "
                        "fastest (default: on CUDA; no effect on a CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network, CUDA graphs on CUDA (docs/performance.md: gains, costs)")
    p.add_argument("--eval-batch-size", type=at_least(1), default=256,
                   help="clips per step when scoring (default: 256)")


def resolve_speed_choices(args, device, data_bytes):
    """Decide in args each speed choice left at auto, set cudnn.benchmark; -> the line stating them. A CPU
    gets fp32 (bf16 does not speed it up); CUDA all the rest, resident data if data_bytes fit the GPU."""
    cuda = device.type == "cuda"
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    if args.fused_adam is None:
        args.fused_adam = cuda
    if args.cudnn_benchmark is None:
        args.cudnn_benchmark = cuda
    if cuda and args.resident is not False:
        free_bytes = torch.cuda.mem_get_info(device)[0]
        fits = data_bytes <= free_bytes - GPU_RESERVE_BYTES
        sizes = (f"the spectrograms ({data_bytes / 2**30:.1f} GiB) do not fit in the GPU's free "
                 f"{free_bytes / 2**30:.1f} GiB with {GPU_RESERVE_BYTES / 2**30:.0f} GiB to spare")
        if args.resident and not fits:
            raise SystemExit(f"error: --resident: {sizes}; drop --resident to read pinned host batches")
        if not fits:
            log(f"{sizes}: pinned host batches")
        args.resident = fits
    args.resident = bool(args.resident)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # fixed input shape: autotuning pays once
    return (f"device {device}: precision {args.precision}, fused Adam {on_off(args.fused_adam)}, "
            f"resident data {on_off(args.resident)}, cudnn.benchmark {on_off(args.cudnn_benchmark)}, "
            f"compile {on_off(args.compile)}")


def on_off(flag):
    return "on" if flag else "off"


def on_device(model, device):  # channels_last: the same numbers, faster on a CPU (oneDNN) and cuDNN's bf16
    return model.to(device, memory_format=torch.channels_last)


def compile_model(model, device):  # --compile: inductor's fused kernels; on CUDA, CUDA graphs too
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def to_device_source(spectrograms, device, resident):  # where batches are read: on device, or the memmap
    return upload(spectrograms, device) if resident else spectrograms


def upload(spectrograms, device, chunk_rows=1024):
    """The array (N, N_MELS, N_FRAMES) as a tensor of its dtype on device, copied in bounded chunks."""
    resident = torch.empty(spectrograms.shape, dtype=getattr(torch, spectrograms.dtype.name), device=device)
    for start in tqdm(range(0, len(spectrograms), chunk_rows), desc=f"to {device}", unit="chunk",
                      leave=False, disable=not is_main()):
        chunk = np.array(spectrograms[start:start + chunk_rows])  # writable: torch warns on a read-only map
        resident[start:start + chunk_rows] = torch.from_numpy(chunk)
    return resident


def get_batch(source, rows, rows_on_device):
    """Spectrogram rows -> (B, N_MELS, N_FRAMES) on rows_on_device's device. rows: sorted, to read a memmap;
    rows_on_device: the same, to index a resident tensor with no host copy (it would stall the GPU)."""
    if isinstance(source, torch.Tensor):
        return source[rows_on_device]
    batch = torch.from_numpy(np.asarray(source[rows]))
    if rows_on_device.is_cuda:
        return batch.pin_memory().to(rows_on_device.device, non_blocking=True)
    return batch


# -----------------------------------------------------------------------------
# torchrun: one process per GPU (one process without torchrun)
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def log(message):  # a line above any progress bar, from the main process only
    if is_main():
        tqdm.write(message)


def setup_distributed(device_name):  # the process group under torchrun; -> this process's device
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def parallel(model, device, args, start_epoch):
    """-> (the model to train: DDP under torchrun, compiled with --compile; the plain model, saved)."""
    plain = model
    if world_size() > 1:
        if device.type == "cuda":  # batch norm over the global batch, as on one GPU
            model = plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + 1000 * rank() + start_epoch)  # each process its own dropout masks
    if args.compile:
        model = compile_model(model, device)
    return model, plain
