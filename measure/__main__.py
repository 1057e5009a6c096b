"""`python -m measure --write-schema | --markdown`: regenerate schemas/objects.json or the README table."""

from measure.features import main

main()
