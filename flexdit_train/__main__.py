"""`python -m flexdit_train` runs the Hydra training app."""

from flexdit_train.train import main

if __name__ == "__main__":
    main()
