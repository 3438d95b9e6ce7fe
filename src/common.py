"""The paper (Dabral, Deshmukh and Malapati, "A Multi-scale Convolutional Neural Network Architecture for
Music Auto-Tagging", Springer 2018): features, tags, splits and their audit, the multi-scale CNN, metrics.
Every constant is the original system's (docs/original.md; the README's table of deviations: where not)."""
import csv
import gzip
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# ---- Features: log-mel spectrogram, 128 bands x 628 frames for a 29.1 s MTAT clip
SAMPLE_RATE = 11025  # Hz, audio is resampled to this on load
N_FFT = 2048  # samples per FFT window (186 ms at 11,025 Hz)
HOP_LENGTH = 512  # samples between frames (46 ms)
N_MELS = 128
N_FRAMES = 628  # frames of one MTAT clip, the network's input width
LOG_FLOOR = 1e-20  # mel power is clipped here before the natural log

BLOCK_S = 30  # seconds of source audio decoded, resampled and framed at a time
PAD_MODE = "reflect"  # the STFT's centring: N_FFT // 2 samples reflected at each end (librosa 2018's default)
RESAMPLERS = ("soxr_hq", "kaiser_best")  # librosa 0.11's default; resampy's, librosa 2018's (the original's)
RESAMPLER = "soxr_hq"  # the default of the functions below; a script sets it from its flag or its data


def feature_params(resampler=None):
    """The feature parameters as a dict (resampler: one of RESAMPLERS, else RESAMPLER); stored with
    spectrograms and checkpoints, whose readers compare theirs with feature_params(their resampler)."""
    return dict(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS, n_frames=N_FRAMES,
                log_floor=LOG_FLOOR, pad_mode=PAD_MODE,
                resampler=resampler if resampler in RESAMPLERS else RESAMPLER)


# The pipeline decode -> resample -> log-mel passes blocks along, so memory does not grow with a file.
# Each stage holds back its last block until it knows it is the last: a one-block file (an MTAT clip)
# is computed exactly as librosa.load + melspectrogram do, longer ones to float32 rounding.
def decode(path, block_s=BLOCK_S):
    """Audio file -> (sample rate, mono float32 blocks (n,) of block_s seconds, None: one); soundfile, else
    librosa whole. ValueError naming the file: not a regular file, empty, or samples not finite."""
    import soundfile
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:  # not blocking: a FIFO put in its place meanwhile
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as error:  # a decoder would call it "not audio"
        raise ValueError(f"{path}: cannot be read ({error.strerror.lower()})") from None
    try:
        f = soundfile.SoundFile(os.fsencode(path))  # a name that is not UTF-8 too
    except soundfile.LibsndfileError:  # audioread, as librosa.load(path) would, with any name
        import audioread
        import librosa
        with audioread.audio_open(path) as source:
            audio, rate = librosa.load(source, sr=None, mono=True)
        return rate, finite_blocks(path, iter([audio]), rate)

    def blocks():  # not f.blocks: its last block keeps stale frames when an MP3 decodes short
        with f:
            while len(block := f.read(block_s * f.samplerate if block_s else -1, dtype="float32",
                                      always_2d=True)):
                yield np.mean(block.T, axis=0)
    return f.samplerate, finite_blocks(path, blocks(), f.samplerate)


def finite_blocks(path, blocks, rate):
    n_seen = 0
    for block in blocks:
        bad = ~np.isfinite(block)
        if bad.any():
            raise ValueError(f"{path}: decodes, but its samples are not all finite (NaN or inf, first "
                             f"at {(n_seen + np.argmax(bad)) / rate:.1f} s)")
        n_seen += len(block)
        yield block


def resample(rate, blocks, resampler=None):
    """Mono blocks at `rate` -> blocks at SAMPLE_RATE, ceil(n * SAMPLE_RATE / rate) samples in all as
    librosa.resample gives; soxr_hq streams, kaiser_best (resampy) yields the whole file as one block."""
    import soxr
    if rate == SAMPLE_RATE:
        yield from blocks
        return
    if (resampler or RESAMPLER) == "kaiser_best":
        import librosa
        audio = np.concatenate([np.zeros(0, np.float32), *blocks])
        if len(audio):  # resampy refuses an empty signal
            audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="kaiser_best")
        yield audio
        return
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    n_in, n_out, held = 0, 0, None
    for block in blocks:
        n_in += len(block)
        if held is not None:
            yield held
        held = stream.resample_chunk(block)
        n_out += len(held)
    tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
    n_target = int(np.ceil(n_in * (float(SAMPLE_RATE) / rate)))
    yield np.concatenate([held if held is not None else np.zeros(0, np.float32), tail,
                          np.zeros(max(n_target - n_out - len(tail), 0), np.float32)])


def log_mel_frames(blocks):
    """Mono blocks at SAMPLE_RATE -> float32 (N_MELS, k) per block: librosa's centred mel power spectrogram
    of the whole waveform, clipped at LOG_FLOOR, natural log; 1 + n_samples // HOP_LENGTH frames in all."""
    import librosa
    half, started = N_FFT // 2, False
    blocks = iter(blocks)
    pending, upcoming = np.zeros(0, np.float32), next(blocks, None)
    while upcoming is not None:
        block, upcoming = upcoming, next(blocks, None)
        buffer = np.concatenate([pending, block])
        if not len(buffer) or (not started and upcoming is not None and len(buffer) <= half):
            pending = buffer  # the start's reflection needs half + 1 samples (or the whole audio)
            continue
        # both ends at once where the audio is one buffer: np.pad reflects a short one repeatedly
        buffer = np.pad(buffer, (0 if started else half, half if upcoming is None else 0), mode=PAD_MODE)
        started = True
        n_frames = max(0, 1 + (len(buffer) - N_FFT) // HOP_LENGTH)
        pending = buffer[n_frames * HOP_LENGTH:]
        if n_frames:
            mel_power = librosa.feature.melspectrogram(
                y=buffer[:(n_frames - 1) * HOP_LENGTH + N_FFT], sr=SAMPLE_RATE, n_fft=N_FFT,
                hop_length=HOP_LENGTH, n_mels=N_MELS, center=False)
            yield np.log(np.maximum(mel_power, LOG_FLOOR)).astype(np.float32)


def read_log_mel(path, block_s=BLOCK_S, resampler=None):
    """Audio file -> (spec float32 (N_MELS, 1 + n_samples // HOP_LENGTH), duration_s); ValueError naming
    the file when it does not decode, holds no samples, or its log-mel is not finite."""
    n_samples = 0

    def counted(blocks):
        nonlocal n_samples
        for block in blocks:
            n_samples += len(block)
            yield block
    try:
        rate, blocks = decode(path, block_s)
        frames = list(log_mel_frames(counted(resample(rate, blocks, resampler))))
    except Exception as error:  # each decoder raises its own types, often with no message
        if isinstance(error, ValueError) and str(error).startswith(str(path)):
            raise
        error_text = error
    else:
        if n_samples == 0:
            raise ValueError(f"{path}: no audio samples decoded")
        spec = np.concatenate(frames, axis=1)
        if not np.isfinite(spec).all():
            raise ValueError(f"{path}: its log-mel holds NaN or inf (the audio's power overflows float32)")
        return spec, n_samples / SAMPLE_RATE
    message = str(error_text).splitlines()[0][:200] if str(error_text) else ""
    fix = "" if type(error_text).__name__ != "NoBackendError" else "; not audio, or damaged" if shutil.which(
        "ffmpeg") else "; not audio, or a format only ffmpeg decodes (.m4a, .aac, .wma ...): install ffmpeg"
    raise ValueError(f"{path}: cannot decode audio ({type(error_text).__name__}"
                     f"{': ' + message if message else ''}){fix}")


def load_audio(path, resampler=None):
    """The whole file decoded and resampled: float32 ndarray (n_samples,) at SAMPLE_RATE."""
    rate, blocks = decode(path, None)
    return np.concatenate(list(resample(rate, blocks, resampler)))


def warm_up():
    """The pipeline on a second of silence: imports and numba's compilation paid before a pool forks."""
    list(log_mel_frames(resample(16000, [np.zeros(16000, np.float32)])))


def log_mel(path, n_frames=N_FRAMES, block_s=BLOCK_S, resampler=None):
    """read_log_mel's spectrogram, float32 (N_MELS, n_frames) by fit_frames; n_frames None: every frame."""
    spec = read_log_mel(path, block_s, resampler)[0]
    return spec if n_frames is None else fit_frames(spec, n_frames)


def fit_frames(spec, n_frames=N_FRAMES):
    """(N_MELS, n) -> (N_MELS, n_frames), same dtype: cut, or padded at the end with log(LOG_FLOOR)."""
    if spec.shape[1] >= n_frames:
        return spec[:, :n_frames]
    pad = np.full((spec.shape[0], n_frames - spec.shape[1]), np.log(LOG_FLOOR), spec.dtype)
    return np.concatenate([spec, pad], axis=1)


# ---- Tags: read MTAT annotations, merge synonyms, keep the most frequent
SYNONYMS = [
    ["beat", "beats"], ["chant", "chanting"], ["choir", "choral"], ["classical", "clasical", "classic"],
    ["drum", "drums"], ["electro", "electronic", "electronica", "electric"], ["fast", "fast beat", "quick"],
    ["female", "female singer", "female singing", "female vocals", "female voice",
     "woman", "woman singing", "women"],
    ["flute", "flutes"], ["guitar", "guitars"], ["hard", "hard rock"], ["harpsichord", "harpsicord"],
    ["heavy", "heavy metal", "metal"], ["horn", "horns"], ["india", "indian"], ["jazz", "jazzy"],
    ["male", "male singer", "male vocal", "male vocals", "male voice", "man", "man singing", "men"],
    ["no beat", "no drums"],
    ["no singer", "no singing", "no vocal", "no vocals", "no voice", "no voices", "instrumental"],
    ["opera", "operatic"], ["orchestra", "orchestral"], ["quiet", "silence"], ["singer", "singing"],
    ["space", "spacey"], ["string", "strings"], ["synth", "synthesizer"], ["violin", "violins"],
    ["vocal", "vocals", "voice", "voices"], ["strange", "weird"],
]


def read_annotations(csv_path):
    """MTAT's annotations_final.csv (quoted, tab-separated, CRLF), or a gzip of it -> (clip_ids int64 (N,),
    tags uint8 0/1 (N, T), tag_names (T = 188 str, the file's column order), mp3_paths (N str under mp3/:
    'f/artist-...mp3')). ValueError naming the file (and line) when neither text nor gzip, or not MTAT's form:
    header 'clip_id', tag names..., 'mp3_path' (no byte-order mark), >= 1 row as long, int ids, tags 0/1."""
    with open(csv_path, "rb") as f:  # gzip by its magic bytes, whatever the name
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    try:
        with opener(csv_path, "rt", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{csv_path}: neither UTF-8 text nor an intact gzip ({error}), so not MTAT's "
                         "annotations; give MTAT's annotations_final.csv or a gzip of it") from None
    if not rows:
        raise ValueError(f"{csv_path}: empty file")
    if rows[0] and rows[0][0].startswith("\ufeff"):
        raise ValueError(f"{csv_path}: starts with a byte-order mark (saved by a spreadsheet?); "
                         "save it as UTF-8 without one")
    if len(rows[0]) < 2 or rows[0][0] != "clip_id" or rows[0][-1] != "mp3_path":
        raise ValueError(f"{csv_path}: not an MTAT annotations file (expected a header "
                         "'clip_id', tag names..., 'mp3_path', tab-separated)")
    header, numbered = rows[0], [(line, r) for line, r in enumerate(rows[1:], 2) if r]
    twice = sorted({name for name in header[1:-1] if header[1:-1].count(name) > 1})
    if twice:  # one name, two columns: a tag's labels would be those of one of them, unsaid
        raise ValueError(f"{csv_path}: the header names the tag(s) {', '.join(map(repr, twice))} more than "
                         "once; give each tag column a name of its own")
    if not numbered:
        raise ValueError(f"{csv_path}: a header but no clip rows")
    binary = {"0", "1"}
    for line, r in numbered:
        if len(r) != len(header):
            raise ValueError(f"{csv_path}: line {line} has {len(r)} fields, the header {len(header)}; "
                             "the file is truncated or corrupt")
        digits = r[0].strip().removeprefix("-")
        if not (digits.isascii() and digits.isdigit() and len(digits) < 20 and int(digits) < 2**63):
            raise ValueError(f"{csv_path}: line {line}: clip_id {r[0]!r} is not an integer of digits 0-9 "
                             "within int64 (MTAT's are below 60000)")
        if not binary.issuperset(r[1:-1]):
            i = next(i for i, value in enumerate(r[1:-1], 1) if value not in binary)
            raise ValueError(f"{csv_path}: line {line}: tag {header[i]!r} is {r[i]!r}, not 0 or 1")
    body = [r for _, r in numbered]
    clip_ids = np.array([r[0] for r in body], dtype=np.int64)
    tags = np.array([r[1:-1] for r in body], dtype=np.uint8).reshape(len(body), len(header) - 2)
    return clip_ids, tags, header[1:-1], [r[-1] for r in body]


def merge_synonyms(tags, tag_names, synonyms=SYNONYMS):
    """0/1 (N, T), T names -> uint8 (N, T'), T' names (135 for MTAT): each synonym group becomes one
    tag, the OR of the members present, named after its first member, at the column of whichever
    member comes first (a group with none present is skipped); other tags keep their columns."""
    group_of = {member: group for group in synonyms for member in group}
    columns, names, done = [], [], set()
    for name in tag_names:
        group = group_of.get(name)
        if group is None:
            columns.append(tags[:, tag_names.index(name)])
            names.append(name)
        elif group[0] not in done:
            done.add(group[0])
            members = [tag_names.index(m) for m in group if m in tag_names]
            columns.append(tags[:, members].max(axis=1))
            names.append(group[0])
    return np.stack(columns, axis=1).astype(np.uint8), names


def top_tags(tags, tag_names, n=50):
    """The n most frequent tags, most frequent first, ties in tag_names' order: (N, n), n names."""
    order = np.argsort(-tags.sum(axis=0, dtype=np.int64), kind="stable")[:n]
    return tags[:, order], [tag_names[i] for i in order]


def load_tags(csv_path, n_tags=50, merge=True):
    """Annotations -> (clip_ids (N,), labels uint8 (N, n_tags), tag_names, mp3_paths)."""
    clip_ids, tags, tag_names, mp3_paths = read_annotations(csv_path)
    if merge:
        tags, tag_names = merge_synonyms(tags, tag_names)
    tags, tag_names = top_tags(tags, tag_names, n_tags)
    return clip_ids, tags, tag_names, mp3_paths


# ---- Splits
N_CLIPS = 25863  # rows of MTAT's annotations_final.csv
# The original's weight tensors, in the order it drew them from the split's RandomState before
# shuffling (conv: out, in, kh, kw; dense: in, out)
PAPER_WEIGHT_SHAPES = [(50, 1, 3, 7), (100, 50, 3, 5), (70, 100, 3, 3), (100, 1, 3, 5), (70, 100, 3, 3),
                       (70, 1, 3, 3), (70, 210, 3, 3), (70, 70, 3, 3), (5040, 500), (500, 50)]
SPLITS_DIR = Path(__file__).resolve().parent / "splits"  # the clean split's lists (README there)
CLEAN_SPLIT_FILES = ("mtat_clean_train.txt", "mtat_clean_valid.txt", "mtat_clean_test.txt")
# The three MTAT clips whose MP3 holds no audio (clip ids 35644, 55753, 57881), by their
# mp3_path: the split is a rule on paths, and a path names the broken file itself.
BROKEN_CLIPS = ("6/norine_braun-now_and_zen-08-gently-117-146.mp3",
                "8/jacob_heringman-josquin_des_prez_lute_settings-19-gintzler__pater_noster-204-233.mp3",
                "9/american_baroque-dances_and_suites_of_rameau_and_couperin-25-le_petit_rien_xiveme_ordre_"
                "couperin-88-117.mp3")
FOLDER_PARTS = ("0123456789ab", "c", "def")  # MTAT's folders of training, validation, test


def original_draws(rng, shapes=PAPER_WEIGHT_SHAPES):
    """The original's initial weights from rng (a RandomState), float64: per shape normal(0, Glorot std
    sqrt(2 / (fan_in + fan_out))), a conv's fans times its kernel area; the last (sigmoid output) times 4."""
    draws = []
    for i, shape in enumerate(shapes):
        area = int(np.prod(shape[2:]))
        fans = (shape[1] * area, shape[0] * area) if len(shape) == 4 else shape
        gain = 4.0 if i == len(shapes) - 1 else 1.0
        draws.append(gain * rng.normal(0.0, np.sqrt(2.0 / sum(fans)), size=shape))
    return draws


def original_order(n_clips=N_CLIPS, seed=1337):
    """(rng, order): RandomState(seed) after the weight draws and its shuffle of the n_clips rows,
    which the original went on to shuffle its training rows with; order int64 (n_clips,):
    validation the first 2,000, test the next n_clips - 20,000, training the last 18,000 (epoch 1's)."""
    rng = np.random.RandomState(seed)
    original_draws(rng)
    order = np.arange(n_clips)
    rng.shuffle(order)
    return rng, order


def paper_split(n_clips=N_CLIPS, seed=1337):
    """The original split (original_order) -> sorted int64 train, val, test: (18000,), (2000,), (5863,)."""
    n_val, n_test = 2000, n_clips - 2000 - 18000
    if n_test < 0:
        raise ValueError(f"paper_split needs at least 20,000 clips, got {n_clips}")
    order = original_order(n_clips, seed)[1]
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    return np.sort(train), np.sort(val), np.sort(test)


def random_split(n_clips, n_train, n_val, seed=1337):
    """A seeded split -> sorted, disjoint int64 train (n_train,), val (n_val,), test (the rest)."""
    if n_train <= 0 or n_val <= 0 or n_train + n_val >= n_clips:
        raise ValueError(f"cannot split {n_clips} clips into {n_train} training, "
                         f"{n_val} validation and at least 1 test clip")
    order = np.random.RandomState(seed).permutation(n_clips)
    train, val, test = np.split(order, [n_train, n_train + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


def clean_split(clip_ids, splits_dir=SPLITS_DIR):
    """The field's song-disjoint split (Lee et al. 2017; splits/README.md): clip_ids (N,) -> sorted int64
    train, val, test rows, (15244,), (1529,), (4332,); ValueError naming the listed clips missing."""
    row_of = {int(clip_id): row for row, clip_id in enumerate(clip_ids)}
    parts, missing = [], []
    for name in CLEAN_SPLIT_FILES:
        listed = np.loadtxt(Path(splits_dir) / name, dtype=np.int64, ndmin=1)
        missing += [int(c) for c in listed if int(c) not in row_of]
        parts.append(np.sort(np.array([row_of.get(int(c), -1) for c in listed], dtype=np.int64)))
    if missing:
        raise ValueError(f"the annotations lack {len(missing)} of the clean split's "
                         f"{sum(len(p) for p in parts):,} clips (clip ids {', '.join(map(str, missing[:5]))}"
                         f"{', ...' if len(missing) > 5 else ''}); the clean split needs MTAT's "
                         "full annotations_final.csv")
    return tuple(parts)


def folder_split(mp3_paths):
    """MTAT's folder split (MARBLE's): '<folder>/<name>.mp3' paths (N,) -> sorted int64 train, val, test
    rows, (18706,), (1825,), (5329,), BROKEN_CLIPS left out; ValueError naming a path outside 0..f."""
    folders = [path.split("/", 1)[0] if "/" in path else "" for path in mp3_paths]
    outside = [path for path, folder in zip(mp3_paths, folders)
               if len(folder) != 1 or folder not in "0123456789abcdef"]
    if outside:
        raise ValueError(f"{len(outside):,} mp3_path(s) are not in one of MTAT's folders 0..f (e.g. "
                         f"'{outside[0]}'); the folder split needs MTAT's layout '<folder>/<name>.mp3'")
    return tuple(np.array([row for row, (folder, path) in enumerate(zip(folders, mp3_paths))
                           if folder in part and path not in BROKEN_CLIPS], dtype=np.int64)
                 for part in FOLDER_PARTS)


def parse_mp3_path(mp3_path):
    """'<folder>/<artist>-<album>-<track no>-<title>-<start>-<end>.mp3' -> (song, album, artist) keys:
    the name without '-<start>-<end>.mp3', 'artist-album', 'artist'; None under 6 fields or a non-numeric
    start or end. All real names have 6 fields; a '-' inside one would shift album and artist, not song."""
    name = mp3_path.rsplit("/", 1)[-1]
    name = name[:-4] if name.lower().endswith(".mp3") else name
    fields = name.split("-")
    if len(fields) < 6 or not (fields[-1].isdigit() and fields[-2].isdigit()):
        return None
    return "-".join(fields[:-2]), "-".join(fields[:2]), fields[0]


def split_overlap(mp3_paths, train_idx, eval_idx):
    """Leakage audit -> dict: n_clips; song, album, artist: evaluation clips sharing that with a training
    clip; unparsed: names that do not parse. Blind to a song spelt twice and to compilations' artists."""
    trained = [parse_mp3_path(mp3_paths[row]) for row in train_idx]
    seen = [{keys[k] for keys in trained if keys} for k in range(3)]  # song, album, artist keys
    evaluated = [parse_mp3_path(mp3_paths[row]) for row in eval_idx]
    shared = {what: sum(keys is not None and keys[k] in seen[k] for keys in evaluated)
              for k, what in enumerate(("song", "album", "artist"))}
    return dict(n_clips=len(eval_idx), **shared, unparsed=evaluated.count(None))


# ---- The multi-scale CNN
def conv(in_channels, out_channels, kernel):
    """'same'-padded convolution followed by ReLU (odd kernels only)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2)),
        nn.ReLU(inplace=True))


SCALES = (1, 2, 3)  # the branches: full resolution, average-pooled by (2, 4), by (4, 16)
# the layers with weights, in the order the original drew them (PAPER_WEIGHT_SHAPES)
ORIGINAL_LAYERS = ("branch1.0.0", "branch1.2.0", "branch1.4.0", "branch2.0.0", "branch2.2.0", "branch3.0.0",
                   "merge.0.0", "merge.1.0", "head.2", "head.4")


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose running variance tracks the batch's biased one (/n, not /(n-1)), as the original."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().to(self.running_var.dtype), dim=0, correction=0)
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)
            self.num_batches_tracked += 1
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class MSCNN(nn.Module):
    """Multi-scale CNN of Dabral et al. (2018): (B, 1, 128, 628) normalised log-mel -> (B, n_tags)
    logits (sigmoid for probabilities); layers in docs/original.md, 2,936,810 parameters for 50 tags.
    scales: the branches built, any non-empty subset of SCALES (an ablation; (1,): single-scale); the
    merge convolution takes 70 x len(scales) channels. seed: 1337 gives the original's weights."""

    def __init__(self, n_tags=50, dropout=0.4, bn_momentum=0.01, scales=SCALES, seed=1337):
        super().__init__()
        if not scales or len(set(scales)) != len(scales) or not set(scales) <= set(SCALES):
            raise ValueError(f"scales must be a non-empty subset of {SCALES} without repeats, "
                             f"got {tuple(scales)}")
        self.scales = tuple(sorted(scales))
        if 1 in self.scales:
            self.branch1 = nn.Sequential(
                conv(1, 50, (3, 7)), nn.MaxPool2d((2, 4)),
                conv(50, 100, (3, 5)), nn.MaxPool2d((2, 4)),
                conv(100, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        self.subsample = nn.AvgPool2d((2, 4))  # branch 2's input; applied twice for branch 3
        if 2 in self.scales:
            self.branch2 = nn.Sequential(
                conv(1, 100, (3, 5)), nn.MaxPool2d((2, 4)),
                conv(100, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        if 3 in self.scales:
            self.branch3 = nn.Sequential(conv(1, 70, (3, 3)), nn.MaxPool2d((2, 2)))
        self.merge = nn.Sequential(
            conv(70 * len(self.scales), 70, (3, 3)), conv(70, 70, (3, 3)), nn.MaxPool2d((2, 2)), nn.Flatten())
        # every branch pools the input by 16 in height and 32 in width, the merge by 2 more
        n_features = 70 * (N_MELS // 16) * (N_FRAMES // 64)
        self.head = nn.Sequential(
            BatchNorm(n_features, eps=1e-3, momentum=bn_momentum), nn.Dropout(dropout),
            nn.Linear(n_features, 500), nn.ReLU(inplace=True), nn.Linear(500, n_tags))
        self.reset_parameters(seed)

    def reset_parameters(self, seed=1337):
        """The original's initial weights (original_draws of RandomState(seed)) in the module's dtype:
        conv filters flipped on both axes (the original's is a true convolution), dense weights
        transposed; biases 0; batch norm fresh. Without some branches, theirs are drawn and discarded
        and the merge convolution keeps its branches' input channels, rescaled to its fans' Glorot std."""
        modules = dict(self.named_modules())
        shapes = PAPER_WEIGHT_SHAPES[:-2] + [(self.head[2].in_features, 500),
                                             (500, self.head[4].out_features)]
        draws = original_draws(np.random.RandomState(seed), shapes)
        for name, shape, draw in zip(ORIGINAL_LAYERS, shapes, draws):
            if name not in modules:
                continue
            if name == "merge.0.0" and len(self.scales) < len(SCALES):
                draw = np.concatenate([draw[:, 70 * (s - 1):70 * s] for s in self.scales], axis=1)
                draw *= np.sqrt((shape[0] + shape[1]) / (shape[0] + draw.shape[1]))  # std ~ 1/sqrt(fans)
            weight = draw[:, :, ::-1, ::-1] if draw.ndim == 4 else draw.T
            with torch.no_grad():
                modules[name].weight.copy_(torch.from_numpy(weight.copy()))
                modules[name].bias.zero_()
        self.head[0].reset_parameters()

    def features(self, x):
        """(B, 1, 128, 628) -> the branches' outputs in scale order, each (B, 70, 16, 19)."""
        outputs = []
        for scale in range(1, max(self.scales) + 1):
            if scale > 1:
                x = self.subsample(x)  # scale 2 sees the input pooled once, scale 3 twice
            if scale in self.scales:
                outputs.append(getattr(self, f"branch{scale}")(x))
        return tuple(outputs)

    def embed(self, x):
        """(B, 1, 128, 628) -> (B, 500): the 500-unit layer's activations, after its ReLU (>= 0)."""
        return self.head[:-1](self.merge(torch.cat(self.features(x), dim=1)))

    def forward(self, x):
        """(B, 1, 128, 628) -> (B, n_tags) logits (the last layer on embed)."""
        return self.head[-1](self.embed(x))


def normalise(log_mel_batch, norm_mean, norm_std):
    """(B, N_MELS, n) log-mel -> float32 (B, 1, N_MELS, n) standardised per band by (N_MELS,) tensors."""
    return ((log_mel_batch.float() - norm_mean[:, None]) / norm_std[:, None]).unsqueeze(1)


@torch.no_grad()
def score(model, log_mel_batch, norm_mean, norm_std, bf16=False, embed=False):
    """The one scorer (training, predict.py): log_mel_batch (B, N_MELS, N_FRAMES) -> normalise -> model in
    eval mode -> float32 probabilities (B, n_tags); with embed, also float32 embeddings (B, 500)."""
    x = normalise(log_mel_batch, norm_mean, norm_std)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        if not embed:
            return torch.sigmoid(model(x).float())
        embeddings = model.embed(x)
        return torch.sigmoid(model.head[-1](embeddings).float()), embeddings.float()


# ---- Metrics
def _per_tag(metric, y_true, y_score, per_tag):
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    positives = y_true.sum(axis=0)
    scores = np.full(y_true.shape[1], np.nan)
    scorable = (positives > 0) & (positives < len(y_true))
    if scorable.any():  # one call for all tags, not one per tag
        scores[scorable] = metric(y_true[:, scorable], y_score[:, scorable], average=None)
    return scores if per_tag else macro_mean(scores)


def roc_auc(y_true, y_score, per_tag=False):
    """Macro ROC-AUC of 0/1 y_true (N, T) by any monotone y_score (N, T) over the tags with both
    classes: float (NaN if none); per_tag: the (T,) AUCs instead, NaN for the tags skipped."""
    from sklearn.metrics import roc_auc_score
    return _per_tag(roc_auc_score, y_true, y_score, per_tag)


def pr_auc(y_true, y_score, per_tag=False):
    """Macro PR-AUC (average precision) over the tags with both classes; as roc_auc."""
    from sklearn.metrics import average_precision_score
    return _per_tag(average_precision_score, y_true, y_score, per_tag)


def macro_mean(scores):
    """Mean of per-tag scores (T,) over the scorable tags (not NaN); NaN if there is none."""
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
