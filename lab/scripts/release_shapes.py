"""Release the shapes model from the stage files: ``conceptattention_lab.release`` (see its description).

python lab/scripts/release_shapes.py                  # lab/stages/stage*.json, runs/sNN
python lab/scripts/release_shapes.py --keep-sampler   # keep the shipped guidance and shift
python lab/scripts/release_shapes.py --card-only      # rewrite MODEL_CARD.md only
"""

from conceptattention_lab.release import main

if __name__ == "__main__":
    main()
