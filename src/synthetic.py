"""Synthetic MTAT-shaped demo data: synthesised music whose tags can be heard. write_synthetic_mtat writes
annotations_final.csv in MTAT's format and a 16 kHz mono 29.15 s MP3 per row: a random arrangement in one of
four styles, tagged with what is heard in random MTAT synonyms (common.merge_synonyms merges them).
"""
import io
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter  # scipy comes with librosa
from tqdm import tqdm

import formats
import plumbing

# MTAT's tag columns, in order (from the real annotations_final.csv, whose MD5 get_data.py checks)
MTAT_TAG_NAMES = (
    "no voice,singer,duet,plucking,hard rock,world,bongos,harpsichord,female singing,clasical,sitar,chorus,"
    "female opera,male vocal,vocals,clarinet,heavy,silence,beats,men,woodwind,funky,no strings,chimes,"
    "foreign,no piano,horns,classical,female,no voices,soft rock,eerie,spacey,jazz,guitar,quiet,no beat,"
    "banjo,electric,solo,violins,folk,female voice,wind,happy,ambient,new age,synth,funk,no singing,"
    "middle eastern,trumpet,percussion,drum,airy,voice,repetitive,birds,space,strings,bass,harpsicord,"
    "medieval,male voice,girl,keyboard,acoustic,loud,classic,string,drums,electronic,not classical,chanting,"
    "no violin,not rock,no guitar,organ,no vocal,talking,choral,weird,opera,soprano,fast,acoustic guitar,"
    "electric guitar,male singer,man singing,classical guitar,country,violin,electro,reggae,tribal,dark,"
    "male opera,no vocals,irish,electronica,horn,operatic,arabic,lol,low,instrumental,trance,chant,strange,"
    "drone,synthesizer,heavy metal,modern,disco,bells,man,deep,fast beat,industrial,hard,harp,no flute,"
    "jungle,pop,lute,female vocal,oboe,mellow,orchestral,viola,light,echo,piano,celtic,male vocals,orchestra,"
    "eastern,old,flutes,punk,spanish,sad,sax,slow,male,blues,vocal,indian,no singer,scary,india,woman,"
    "woman singing,rock,dance,piano solo,guitars,no drums,jazzy,singing,cello,calm,female vocals,voices,"
    "different,techno,clapping,house,monks,flute,not opera,not english,oriental,beat,upbeat,soft,noise,choir,"
    "female singer,rap,metal,hip hop,quick,water,baroque,women,fiddle,english").split(",")

CLIP_SAMPLE_RATE = 16000  # Hz, as MTAT's MP3s
CLIP_SAMPLES = 466400  # 29.15 s: decodes to 321,379 samples at 11,025 Hz = 628 frames, no padding needed

SPELLINGS = {  # every tag a clip can get (merged name) -> the MTAT spellings it is written as, at random
    "beat": ["beat", "beats"], "classical": ["classical", "classic", "clasical"], "drum": ["drum", "drums"],
    "electro": ["electronic", "electronica", "electro"], "fast": ["fast", "quick", "fast beat"],
    "female": ["female", "woman", "female vocals"], "flute": ["flute", "flutes"],
    "guitar": ["guitar", "guitars"], "harpsichord": ["harpsichord", "harpsicord"],
    "india": ["indian", "india"], "male": ["male", "man", "male vocals"], "no beat": ["no beat", "no drums"],
    "no singer": ["no vocals", "no voice", "instrumental", "no singer"], "synth": ["synth", "synthesizer"],
    "violin": ["violin", "violins"], "vocal": ["vocal", "vocals", "voice"],
    **{tag: [tag] for tag in ("harp", "loud", "piano", "quiet", "sitar", "slow", "techno")},  # one spelling
}

# ---- Sound: wavetable lines (timbre = harmonic spectra + envelope), a formant voice, drums
TABLE_SIZE = 4096  # samples per wavetable period (a power of two: phase wraps by masking)
VIBRATO = np.sin(2 * np.pi * 5.5 * np.arange(CLIP_SAMPLES) / CLIP_SAMPLE_RATE)  # 5.5 Hz
# Formants F1-F3 (Hz) of a man's a, e, i, o, u (Peterson and Barney); a woman's are ~17% higher
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240]])


def wavetable(amplitudes):
    """One period (TABLE_SIZE,) float32 of sum_k amplitudes[k-1] sin(2 pi k x), peak 1."""
    x, harmonics = np.arange(TABLE_SIZE) / TABLE_SIZE, np.arange(1, len(amplitudes) + 1)
    table = np.asarray(amplitudes) @ np.sin(2 * np.pi * np.outer(harmonics, x))
    return (table / np.abs(table).max()).astype(np.float32)


def power_law(n_harmonics, exponent, odd_only=False):
    """Amplitudes k ** -exponent of harmonics k = 1..n (1: a sawtooth; odd_only: a square)."""
    k = np.arange(1.0, n_harmonics + 1)
    return k ** -exponent * (k % 2 == 1 if odd_only else 1)


def plucked(n_harmonics, position):
    """A string plucked at `position` of its length: harmonics with a node there vanish."""
    k = np.arange(1.0, n_harmonics + 1)
    return np.abs(np.sin(np.pi * k * position)) / k


# spectrum: harmonic amplitudes of the tone; attack_spectrum: the attack's, fading into spectrum with time
# constant brightness (s); attack, decay: the envelope (s); vibrato: relative depth; noise: relative breath;
# low, high: the register (MIDI), harmonics below 8 kHz. male, female: glottal sources (formants come later).
TIMBRES = {
    "piano": dict(spectrum=power_law(4, 2), attack_spectrum=power_law(10, 1), brightness=0.15, attack=0.002,
                  decay=0.8, low=48, high=79),
    "guitar": dict(spectrum=power_law(3, 2), attack_spectrum=plucked(12, 1 / 5), brightness=0.08,
                   attack=0.002, decay=0.5, low=40, high=71),
    "harpsichord": dict(spectrum=plucked(10, 1 / 8), attack_spectrum=power_law(10, 0.5), brightness=0.1,
                        attack=0.001, decay=0.6, low=48, high=79),
    "harp": dict(spectrum=[1, 0.1], attack_spectrum=[1, 0.3, 0.1, 0.05], brightness=0.2, attack=0.003,
                 decay=1.2, low=60, high=91),
    "sitar": dict(spectrum=power_law(13, 0.9), attack_spectrum=power_law(13, 0.4), brightness=0.3,
                  attack=0.002, decay=1.2, low=50, high=74),
    "violin": dict(spectrum=power_law(9, 1), attack=0.08, decay=4.0, vibrato=0.006, low=55, high=81),
    "flute": dict(spectrum=[1, 0.2, 0.05], attack=0.06, decay=4.0, vibrato=0.004, noise=0.08,
                  low=72, high=96),
    "synth": dict(spectrum=power_law(15, 1, odd_only=True), attack=0.005, decay=0.4, low=48, high=72),
    "male": dict(spectrum=power_law(45, 1), attack=0.04, decay=5.0, vibrato=0.012, low=41, high=52),
    "female": dict(spectrum=power_law(22, 1), attack=0.04, decay=5.0, vibrato=0.012, low=53, high=64),
}
for timbre in TIMBRES.values():  # the wavetables: table, and attack_table given an attack_spectrum
    timbre["table"] = wavetable(timbre["spectrum"])
    if "attack_spectrum" in timbre:
        timbre["attack_table"] = wavetable(timbre["attack_spectrum"])


def render_line(onsets, midi, timbre, rng, detune=1.0):
    """A monophonic line, float32 (CLIP_SAMPLES,): note i from sample onsets[i] (sorted); midi <= 0 rests."""
    sr, keep = CLIP_SAMPLE_RATE, np.asarray(onsets) < CLIP_SAMPLES
    onsets, midi = np.append(0, onsets[keep]), np.append(0, np.asarray(midi)[keep])  # rest first
    durations = np.diff(np.append(onsets, CLIP_SAMPLES))
    since = np.arange(CLIP_SAMPLES) - np.repeat(onsets, durations)
    until = np.repeat(onsets + durations, durations) - np.arange(CLIP_SAMPLES)
    s = np.arange(durations.max() + 1) / sr  # seconds
    attack_decay = np.minimum(s / timbre["attack"], 1) * np.exp(-s / timbre["decay"])
    release = np.minimum(s / 0.02, 1)  # 20 ms fade before the next note: no clicks
    envelope = attack_decay.astype(np.float32)[since] * release.astype(np.float32)[until]
    hz = 440.0 * 2.0 ** ((midi.astype(np.float64) - 69) / 12)
    # phase in 1/65536ths of a table sample, so the running sum is exact integers
    step = np.repeat(np.round(hz * detune / sr * TABLE_SIZE * 65536), durations)
    step *= 1 + timbre.get("vibrato", 0) * VIBRATO  # exactly 1 without vibrato
    index = (np.cumsum(step.astype(np.int64)) >> 16) & (TABLE_SIZE - 1)
    tone = timbre["table"][index]
    if "attack_table" in timbre:
        bright = np.exp(-s / timbre["brightness"]).astype(np.float32)[since]
        tone += bright * (timbre["attack_table"][index] - tone)
    if "noise" in timbre:
        tone += timbre["noise"] * np.diff(rng.standard_normal(CLIP_SAMPLES + 1, np.float32))
    line = envelope * tone
    line[np.repeat(midi <= 0, durations)] = 0  # the rests
    return line


def render_voice(onsets, midi, female, rng):
    """A sung line, float32 (CLIP_SAMPLES,): a glottal source through 3 formant resonators (random vowel)."""
    source = render_line(onsets, midi, TIMBRES["female" if female else "male"], rng)
    bounds, voice = np.append(onsets, CLIP_SAMPLES), np.zeros(CLIP_SAMPLES, np.float32)
    for start, stop in itertools.pairwise(bounds):
        formants = VOWELS[rng.integers(len(VOWELS))] * (1.17 if female else 1.0)
        denominator = [1.0]
        for formant, bandwidth in zip(formants, (80, 100, 120)):
            r = np.exp(-np.pi * bandwidth / CLIP_SAMPLE_RATE)  # pole radius
            pole = [1.0, -2 * r * np.cos(2 * np.pi * formant / CLIP_SAMPLE_RATE), r * r]
            denominator = np.convolve(denominator, pole)
        voice[start:stop] = lfilter([1.0], denominator, source[start:stop])
    return voice


def render_drums(pattern, beat_s, rng):
    """The pattern at beat_s seconds per beat on a kit of 0.4 s one-shots. Returns float32 (CLIP_SAMPLES,)."""
    t = np.arange(int(0.4 * CLIP_SAMPLE_RATE)) / CLIP_SAMPLE_RATE
    noise = np.diff(rng.standard_normal(len(t) + 1))  # a first difference tilts it up
    hiss = np.diff(noise, append=0)  # tilted twice: the hi-hat band
    kick_phase = 50 * t + 3 * (1 - np.exp(-t / 0.03))  # pitch falls from 150 to 50 Hz
    kit = {"kick": np.sin(2 * np.pi * kick_phase) * np.exp(-t / 0.12),
           "snare": 0.6 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.05) + 0.5 * noise * np.exp(-t / 0.1),
           "clap": 0.5 * noise * np.exp(-t / 0.03),
           "hat": 0.2 * hiss * np.exp(-t / 0.02), "open hat": 0.2 * hiss * np.exp(-t / 0.12)}
    drums = np.zeros(CLIP_SAMPLES + len(t), np.float32)
    for bar in range(int(CLIP_SAMPLES / CLIP_SAMPLE_RATE / (4 * beat_s)) + 1):
        for drum, beat in pattern:
            start = int((4 * bar + beat) * beat_s * CLIP_SAMPLE_RATE)
            if start < CLIP_SAMPLES:
                drums[start:start + len(kit[drum])] += kit[drum]
    return drums[:CLIP_SAMPLES]


# ---- Composition: style, tempo, key, a 4-bar chord progression, chord and melody lines, mix
MAJOR, MINOR = np.array([0, 2, 4, 5, 7, 9, 11]), np.array([0, 2, 3, 5, 7, 8, 10])
PROGRESSIONS = [[0, 4, 5, 3], [0, 3, 4, 0], [5, 3, 0, 4], [0, 5, 3, 4]]  # scale degree per bar
BPM = {"slow": (50, 70), "medium": (90, 125), "fast": (150, 180), "techno": (124, 136)}
STYLE_TAGS = {"classical": {"classical", "no beat"}, "rock": {"drum", "beat"},
              "techno": {"techno", "drum", "beat", "electro"}, "indian": {"india", "no beat"}}
SINGS = {"classical": 0.15, "rock": 0.6, "techno": 0.3, "indian": 0.3}  # P(vocals)
ROCK = ([("kick", 0), ("kick", 2), ("kick", 2.5), ("snare", 1), ("snare", 3)]
        + [("hat", b / 2) for b in range(8)])  # drum patterns: (drum, position in beats in a 4-beat bar)
FOUR_ON_THE_FLOOR = ([("kick", b) for b in range(4)] + [("open hat", b + 0.5) for b in range(4)]
                     + [("clap", 1), ("clap", 3)] + [("hat", b / 4) for b in range(1, 16, 2)])


def in_key(degrees, tonic, scale):
    """Scale degrees (any integers) -> MIDI notes."""
    degrees = np.asarray(degrees)
    return tonic + 12 * (degrees // 7) + scale[degrees % 7]


def fit_register(midi, low, high):
    """Move notes by whole octaves into [low, high] (a register at least 11 notes wide)."""
    midi = np.asarray(midi)
    midi = np.where(midi < low, midi + 12 * np.ceil((low - midi) / 12), midi)
    return midi - 12 * np.maximum(0, np.ceil((midi - high) / 12))


def melody(rng, n_notes, tonic, scale, low, high, sing=False):
    """A random walk on the scale in [low, high], a note a beat; a singer breathes (rests) every 4th bar."""
    degrees = np.cumsum(rng.choice([-2, -1, -1, 0, 1, 1, 2], size=n_notes)) + rng.integers(7)
    midi = fit_register(in_key(degrees, tonic, scale), low, high)
    if sing:
        midi[np.arange(n_notes) // 4 % 4 == 3] = 0
    return midi


def synthesise_clip(rng):
    """A random clip -> (float32 (CLIP_SAMPLES,) at 16 kHz in (-1, 1), its audible tags: SPELLINGS keys)."""
    style = str(rng.choice(["classical", "rock", "techno", "indian"], p=[0.3, 0.3, 0.2, 0.2]))
    tempo = "techno" if style == "techno" else str(rng.choice(["slow", "medium", "fast"], p=[0.3, 0.4, 0.3]))
    beat_s = 60.0 / rng.uniform(*BPM[tempo])
    n_beats = int(CLIP_SAMPLES / CLIP_SAMPLE_RATE / beat_s) + 1
    beats, eighths = np.arange(n_beats), np.arange(2 * n_beats)
    onsets = (beats * beat_s * CLIP_SAMPLE_RATE).astype(np.int64)
    eighth_onsets = (eighths * beat_s / 2 * CLIP_SAMPLE_RATE).astype(np.int64)
    tonic, scale = 48 + rng.integers(12), MAJOR if rng.random() < 0.5 else MINOR
    chord_roots = np.array(PROGRESSIONS[rng.integers(len(PROGRESSIONS))])[beats // 4 % 4]
    if style == "classical":
        instruments = ([i for i in ["violin", "piano", "flute", "harp", "harpsichord"] if rng.random() < 0.45]
                       or [str(rng.choice(["violin", "piano", "harp"]))])
    else:
        instruments = {"rock": ["guitar"] + [i for i in ["piano", "synth"] if rng.random() < 0.25],
                       "techno": ["synth"], "indian": ["sitar"] + ["flute"] * (rng.random() < 0.3)}[style]
    tags = set(instruments) | STYLE_TAGS[style]
    parts = []  # (audio, gain in dB)
    for name in instruments:
        timbre = TIMBRES[name]
        low, high = timbre["low"], timbre["high"]
        if name in ("piano", "guitar"):  # block or strummed chords, one per beat
            for voice in range(3 + (name == "guitar")):
                strum = int(0.012 * CLIP_SAMPLE_RATE * voice) * (name == "guitar")
                notes = fit_register(in_key(chord_roots + 2 * voice, tonic, scale), low, high)
                parts.append((render_line(onsets + strum, notes, timbre, rng), -4))
        elif name in ("harp", "harpsichord"):  # arpeggios over two octaves, two notes a beat
            degrees = np.repeat(chord_roots, 2) + 2 * (eighths % 4)
            notes = fit_register(in_key(degrees, tonic, scale) + 12 * (eighths % 8 >= 4), low, high)
            parts.append((render_line(eighth_onsets, notes, timbre, rng), 0))
        else:  # violin, flute, sitar, synth: a melody
            notes = melody(rng, n_beats, tonic, scale, low, high)
            parts.append((render_line(onsets, notes, timbre, rng), 0))
        if name == "synth":  # a detuned twin (the analogue chorus) and a bass in eighths
            parts.append((render_line(onsets, notes, timbre, rng, detune=1.006), 0))
            bass = fit_register(in_key(np.repeat(chord_roots, 2), tonic, scale), 31, 43)
            parts.append((render_line(eighth_onsets, bass, timbre, rng), -2))
        if name == "sitar":  # the tanpura's drone: tonic and fifth below, a pluck a beat
            drone = np.where(beats % 2, tonic - 5, tonic - 12)
            parts.append((render_line(onsets, drone, timbre, rng), -6))
    if "drum" in tags:
        parts.append((render_drums(FOUR_ON_THE_FLOOR if style == "techno" else ROCK, beat_s, rng), 0))
    if rng.random() < SINGS[style]:
        singer = "female" if rng.random() < 0.5 else "male"
        notes = melody(rng, n_beats, tonic, scale, TIMBRES[singer]["low"], TIMBRES[singer]["high"], sing=True)
        parts.append((render_voice(onsets, notes, singer == "female", rng), 3))
        tags |= {"vocal", singer}
    else:
        tags.add("no singer")
    if tempo in ("slow", "fast"):
        tags.add(tempo)
    mix = sum(part / (np.sqrt(np.mean(part ** 2)) + 1e-9) * 10 ** ((gain + rng.uniform(-2, 2)) / 20)
              for part, gain in parts)  # each part at its gain (+-2 dB) relative to unit RMS
    level = str(rng.choice(["loud", "normal", "quiet"], p=[0.2, 0.6, 0.2]))
    rms_db = {"loud": -12.0, "normal": rng.uniform(-26, -18), "quiet": -38.0}[level]
    if level != "normal":
        tags.add(level)
    mix *= 10 ** (rms_db / 20) / np.sqrt(np.mean(mix ** 2))
    return np.tanh(mix).astype(np.float32), tags  # tanh: loud peaks saturate, never clip


# ---- Writing the data set
def clip_path(clip_id):
    """mp3_path of a clip, spread over MTAT's 16 folders: 'a/synthetic-000010.mp3'."""
    return f"{clip_id % 16:x}/synthetic-{clip_id:06d}.mp3"


def annotation_line(fields):
    """One line of MTAT's annotations: every field quoted, tab-separated, CRLF."""
    return "\t".join(f'"{field}"' for field in fields) + "\r\n"


def write_clip(data_dir, seed, clip_id):
    """Synthesise clip clip_id, write its MP3 and return its annotation line."""
    rng = np.random.default_rng([seed, clip_id])  # clip i is the same whatever n_clips is
    audio, tags = synthesise_clip(rng)
    spelled = {str(rng.choice(SPELLINGS[tag])) for tag in sorted(tags)}
    mp3_path = clip_path(clip_id)
    path = data_dir / "mp3" / mp3_path
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()  # encoded in memory (~150 kB): a full disk is then a plain OSError
    sf.write(encoded, audio, CLIP_SAMPLE_RATE, format="MP3")
    with plumbing.atomic_write(path, "wb") as f:
        f.write(encoded.getbuffer())
    return annotation_line([str(clip_id)] + [str(int(tag in spelled)) for tag in MTAT_TAG_NAMES] + [mp3_path])


def write_synthetic_mtat(data_dir, n_clips, seed=0, progress=True, workers=None):
    """Write mp3/ for clips 1..n_clips (`workers` threads; None: all cores), then annotations_final.csv:
    removed first, written last, atomically, after synthetic.json: an interrupted run never looks complete."""
    data_dir = Path(data_dir)
    csv_path = data_dir / "annotations_final.csv"
    csv_path.unlink(missing_ok=True)
    (data_dir / formats.SYNTHETIC_MARKER).unlink(missing_ok=True)
    lines = [annotation_line(["clip_id"] + MTAT_TAG_NAMES + ["mp3_path"])]
    pool = ThreadPoolExecutor(workers or os.cpu_count())
    try:
        rows = pool.map(lambda clip_id: write_clip(data_dir, seed, clip_id), range(1, n_clips + 1))
        lines += tqdm(rows, total=n_clips, desc="synthesising", unit="clip", disable=not progress)
    finally:  # on an error or Ctrl-C, drop the clips not started yet
        pool.shutdown(cancel_futures=True)
    annotations = "".join(lines).encode("utf-8")
    formats.mark_synthetic(data_dir, annotations, n_clips=n_clips, seed=seed)
    with plumbing.atomic_write(csv_path, "wb") as f:
        f.write(annotations)
