"""Generate an image with the built-in shapes model and read where each word went (offline, CPU).

python examples/shapes_maps.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from conceptattention.pipelines import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/example-shapes"))
    args = parser.parse_args()

    pipe = load_pipeline("shapes")
    concepts = ["circle", "square", "grass"]
    result = pipe.generate("a red circle and a blue square on grass", concepts, seed=3)
    # maps: [K, 64, 64], softmax over concepts; where does each concept win?
    winner = result.maps.argmax(0)
    for k, concept in enumerate(concepts):
        print(f"{concept:>7}: wins {100 * (winner == k).float().mean():.0f}% of the pixels")
    # the same image back through encode (a real-image pass: noise at t = 0.5, 4 draws, early stop)
    again = pipe.encode(result.image, concepts, caption="a red circle and a blue square on grass")
    print("generate vs encode maps agree on", f"{100 * (again.maps.argmax(0) == winner).float().mean():.0f}% of pixels")
    files = result.save(args.out)
    print("wrote", ", ".join(sorted(p.name for p in files.values())))


if __name__ == "__main__":
    main()
