"""Synthetic clinical text, so the whole pipeline runs and is testable without real patient data.

Real hospital notes cannot ship with the project, yet experiments need data whose statistics
resemble the real problem: private notes whose vocabulary depends on the hospital's specialty
mix (non-IID clients), several records per patient (patient-level privacy), and a separate
public corpus for pretraining the base model. Everything here is templated over a small
vocabulary so a tiny language model can learn it within a test's time budget, and every
generator is deterministic so experiments are reproducible.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from fedllm.data.records import ClinicalRecord, DataError

SPECIALTIES: tuple[str, ...] = (
    "cardiology",
    "oncology",
    "neurology",
    "pediatrics",
    "emergency",
    "endocrinology",
)

_NOTE_SHARE = 0.6
_RECORDS_PER_PATIENT = (1, 5)
_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class _NumberRange:
    """An inclusive range of numbers printed with a fixed number of decimals.

    Sampling and enumeration share one formula, so the vocabulary corpus contains exactly
    the strings the generators can print.
    """

    low: float
    high: float
    decimals: int = 0

    def _steps(self) -> int:
        return round((self.high - self.low) * 10**self.decimals)

    def _format(self, step: int) -> str:
        return f"{self.low + step / 10**self.decimals:.{self.decimals}f}"

    def sample(self, rng: random.Random) -> str:
        return self._format(rng.randint(0, self._steps()))

    def all_values(self) -> list[str]:
        return [self._format(step) for step in range(self._steps() + 1)]


@dataclass(frozen=True)
class _Condition:
    """A diagnosis with the facts that notes and answers state about it.

    Fixed associations (symptom, test, treatment) give the model something consistent to
    learn, and let evaluation probe whether that knowledge survived federated training.
    """

    name: str
    symptom: str
    test: str
    treatment: str


@dataclass(frozen=True)
class _Profile:
    """Everything that makes one specialty's text distinguishable from another's."""

    conditions: tuple[_Condition, ...]
    history: tuple[str, ...]
    findings: tuple[str, ...]
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    numbers: Mapping[str, _NumberRange] = field(default_factory=dict)
    sexes: tuple[str, ...] = ("man", "woman")


_SHARED_CHOICES: Mapping[str, tuple[str, ...]] = {
    "duration": ("two days", "one week", "three weeks", "several months"),
    "followup": ("one week", "two weeks", "one month", "three months"),
    "progress": ("improving", "stable", "worse"),
}

_SHARED_NUMBERS: Mapping[str, _NumberRange] = {
    "age": _NumberRange(18, 90),
    "hr": _NumberRange(58, 110),
    "sbp": _NumberRange(100, 165),
    "dbp": _NumberRange(60, 98),
    "temp": _NumberRange(36.2, 37.8, 1),
    "spo2": _NumberRange(93, 100),
}

_PROFILES: Mapping[str, _Profile] = {
    "cardiology": _Profile(
        conditions=(
            _Condition(
                "stable angina", "chest pain on exertion", "exercise stress test", "aspirin"
            ),
            _Condition(
                "heart failure",
                "shortness of breath and leg swelling",
                "echocardiography",
                "a diuretic",
            ),
            _Condition("atrial fibrillation", "palpitations", "ECG", "a beta blocker"),
            _Condition(
                "hypertension",
                "morning headache",
                "blood pressure monitoring",
                "an ACE inhibitor",
            ),
            _Condition(
                "myocardial infarction",
                "crushing chest pain",
                "troponin testing",
                "urgent angiography",
            ),
        ),
        history=("hypertension", "high cholesterol", "smoking", "a prior stent"),
        findings=(
            "ECG shows sinus rhythm with QRS {qrs} ms.",
            "Ejection fraction is {ef}%.",
            "Troponin is {troponin} ng/L.",
        ),
        numbers={
            "qrs": _NumberRange(80, 140),
            "ef": _NumberRange(25, 65),
            "troponin": _NumberRange(3, 250),
        },
    ),
    "oncology": _Profile(
        conditions=(
            _Condition(
                "breast cancer", "a breast lump", "core needle biopsy", "surgery and tamoxifen"
            ),
            _Condition(
                "lung cancer",
                "persistent cough with weight loss",
                "chest CT scan",
                "chemotherapy and radiation",
            ),
            _Condition("colon cancer", "blood in the stool", "colonoscopy", "surgery"),
            _Condition(
                "lymphoma", "painless swollen lymph nodes", "lymph node biopsy", "chemotherapy"
            ),
            _Condition(
                "neutropenic fever",
                "fever after chemotherapy",
                "blood cultures",
                "broad spectrum antibiotics",
            ),
        ),
        history=("prior chemotherapy", "a family history of cancer", "smoking", "anemia"),
        findings=(
            "Stage {stage} disease, cycle {cycle} of chemotherapy.",
            "Hemoglobin is {hgb} g/dL.",
            "ECOG performance status {ecog}.",
        ),
        choices={"stage": ("I", "II", "III", "IV")},
        numbers={
            "temp": _NumberRange(36.2, 39.5, 1),
            "cycle": _NumberRange(1, 8),
            "hgb": _NumberRange(7.0, 15.0, 1),
            "ecog": _NumberRange(0, 4),
        },
    ),
    "neurology": _Profile(
        conditions=(
            _Condition("migraine", "throbbing headache with nausea", "brain MRI", "a triptan"),
            _Condition(
                "ischemic stroke",
                "sudden weakness of one side",
                "head CT scan",
                "thrombolysis and aspirin",
            ),
            _Condition("epilepsy", "recurrent seizures", "EEG", "levetiracetam"),
            _Condition(
                "parkinson disease", "tremor at rest", "a neurological examination", "levodopa"
            ),
            _Condition(
                "multiple sclerosis", "blurred vision and numbness", "brain MRI", "steroids"
            ),
        ),
        history=("migraine", "a prior stroke", "a head injury", "depression"),
        findings=(
            "Glasgow coma scale {gcs}.",
            "NIHSS score is {nihss}.",
            "Reflexes are {reflexes} and gait is {gait}.",
        ),
        choices={
            "reflexes": ("normal", "brisk", "reduced"),
            "gait": ("steady", "unsteady", "slow"),
        },
        numbers={"gcs": _NumberRange(9, 15), "nihss": _NumberRange(0, 20)},
    ),
    "pediatrics": _Profile(
        conditions=(
            _Condition("asthma", "wheezing at night", "peak flow testing", "an inhaled steroid"),
            _Condition("otitis media", "ear pain and fever", "otoscopy", "amoxicillin"),
            _Condition(
                "bronchiolitis", "cough and fast breathing", "pulse oximetry", "oxygen and fluids"
            ),
            _Condition(
                "gastroenteritis", "vomiting and diarrhea", "stool testing", "oral rehydration"
            ),
            _Condition("croup", "a barking cough", "a throat examination", "dexamethasone"),
        ),
        history=("prematurity", "eczema", "a food allergy", "daycare exposure"),
        findings=(
            "Weight is {weight} kg, on the {percentile} percentile.",
            "Immunizations are {immunizations}.",
            "The parent reports {feeding} feeding.",
        ),
        choices={
            "immunizations": ("up to date", "delayed"),
            "feeding": ("normal", "poor", "reduced"),
        },
        numbers={
            "age": _NumberRange(1, 17),
            "hr": _NumberRange(80, 150),
            "sbp": _NumberRange(85, 120),
            "dbp": _NumberRange(50, 80),
            "weight": _NumberRange(8, 70),
            "percentile": _NumberRange(5, 95),
        },
        sexes=("boy", "girl"),
    ),
    "emergency": _Profile(
        conditions=(
            _Condition("sepsis", "fever and confusion", "blood cultures and lactate", "fluids"),
            _Condition(
                "appendicitis", "right lower abdominal pain", "abdominal CT scan", "surgery"
            ),
            _Condition("hip fracture", "hip pain after a fall", "hip x ray", "pain control"),
            _Condition(
                "anaphylaxis", "hives and facial swelling", "a skin examination", "epinephrine"
            ),
            _Condition(
                "pulmonary embolism",
                "sudden shortness of breath",
                "CT pulmonary angiogram",
                "an anticoagulant",
            ),
        ),
        history=("alcohol use", "kidney disease", "recent surgery", "anticoagulant use"),
        findings=(
            "Triage level {triage}, pain score {pain} out of 10.",
            "Arrived by {arrival}.",
            "Lactate is {lactate} mmol/L.",
        ),
        choices={"arrival": ("ambulance", "car", "helicopter")},
        numbers={
            "hr": _NumberRange(60, 140),
            "sbp": _NumberRange(80, 170),
            "temp": _NumberRange(36.0, 40.0, 1),
            "spo2": _NumberRange(86, 100),
            "triage": _NumberRange(1, 5),
            "pain": _NumberRange(0, 10),
            "lactate": _NumberRange(0.5, 8.0, 1),
        },
    ),
    "endocrinology": _Profile(
        conditions=(
            _Condition(
                "type 2 diabetes", "increased thirst and urination", "HbA1c testing", "metformin"
            ),
            _Condition("type 1 diabetes", "weight loss and thirst", "ketone testing", "insulin"),
            _Condition(
                "hypothyroidism",
                "fatigue and cold intolerance",
                "TSH testing",
                "levothyroxine",
            ),
            _Condition(
                "hyperthyroidism", "weight loss and tremor", "thyroid function tests", "methimazole"
            ),
            _Condition(
                "diabetic ketoacidosis",
                "vomiting and deep breathing",
                "blood ketone testing",
                "insulin and fluids",
            ),
        ),
        history=("obesity", "type 2 diabetes", "thyroid disease", "high cholesterol"),
        findings=(
            "HbA1c is {a1c}%, glucose {glucose} mg/dL.",
            "TSH is {tsh} mU/L.",
            "BMI is {bmi}.",
        ),
        numbers={
            "a1c": _NumberRange(5.0, 12.0, 1),
            "glucose": _NumberRange(70, 400),
            "tsh": _NumberRange(0.1, 15.0, 1),
            "bmi": _NumberRange(18, 45),
        },
    ),
}

_NOTE_TEMPLATES: tuple[str, ...] = (
    "Chief complaint: {symptom}. History: {age} year old {sex} with {history}. "
    "Vitals: HR {hr}, BP {sbp}/{dbp}, temp {temp}, SpO2 {spo2}%. {finding} "
    "Assessment: {condition}. Plan: order {test}, start {treatment}.",
    "Clinic note from {specialty}. Patient is a {age} year old {sex} presenting with {symptom} "
    "for {duration}. Past history of {history}. Vitals: HR {hr}, BP {sbp}/{dbp}. {finding} "
    "Impression: {condition}. Plan: {treatment}, {test}, follow up in {followup}.",
    "Follow up visit. {age} year old {sex} with known {condition} reports {symptom} is "
    "{progress}. Vitals: HR {hr}, temp {temp}, SpO2 {spo2}%. {finding} Assessment: "
    "{condition}, {progress}. Plan: continue {treatment}, repeat {test} in {followup}.",
)

_QA_TEMPLATES: tuple[str, ...] = (
    "Question: A {age} year old {sex} with {history} presents with {symptom}. What is the most "
    "likely diagnosis and the next step?\nAnswer: The most likely diagnosis is {condition}. "
    "The next step is {test}, then {treatment}.",
    "Question: What is the first line treatment for {condition} in {specialty}?\nAnswer: "
    "First line treatment for {condition} is {treatment}. Confirm the diagnosis with {test} "
    "and watch for {symptom}.",
    "Question: Which test confirms {condition} in a patient with {symptom}?\nAnswer: Testing "
    "with {test} confirms {condition}. After the result, the {specialty} team usually starts "
    "{treatment}.",
    "Question: What symptom should raise concern for {condition}?\nAnswer: Concern for "
    "{condition} should rise with {symptom}, especially in a patient with {history}. Order "
    "{test} and consider {treatment}.",
)

_ORGANS: tuple[tuple[str, str, str], ...] = (
    ("heart", "circulatory", "pump blood through the body"),
    ("lung", "respiratory", "exchange oxygen and carbon dioxide"),
    ("brain", "nervous", "control movement, memory and thought"),
    ("thyroid", "endocrine", "regulate metabolism"),
    ("pancreas", "endocrine", "produce insulin and control blood glucose"),
    ("kidney", "urinary", "filter the blood"),
    ("colon", "digestive", "absorb water from the stool"),
    ("lymph node", "immune", "filter lymph and fight infection"),
)

_DRUGS: tuple[tuple[str, str, str, str], ...] = (
    ("aspirin", "an antiplatelet drug", "prevent blood clots", "stomach upset"),
    ("metformin", "an oral diabetes drug", "lower blood glucose", "nausea"),
    ("insulin", "a hormone", "lower blood glucose", "low blood glucose"),
    ("levothyroxine", "a thyroid hormone", "treat hypothyroidism", "palpitations"),
    ("methimazole", "an antithyroid drug", "treat hyperthyroidism", "rash"),
    ("amoxicillin", "an antibiotic", "treat bacterial infection", "diarrhea"),
    ("levodopa", "a dopamine precursor", "treat parkinson disease", "nausea"),
    ("levetiracetam", "an antiseizure drug", "prevent seizures", "fatigue"),
    ("epinephrine", "an adrenergic drug", "treat anaphylaxis", "palpitations"),
    ("tamoxifen", "a hormone therapy", "treat breast cancer", "fatigue"),
    ("dexamethasone", "a steroid", "reduce swelling", "high blood glucose"),
)

_GENERAL_FACTS: tuple[str, ...] = (
    "A normal resting heart rate in adults is between 60 and 100 beats per minute.",
    "Normal body temperature is close to 37.0 degrees.",
    "Oxygen saturation above 94% is usually considered normal.",
    "Blood pressure is written as systolic over diastolic pressure.",
    "Children have a faster heart rate than adults.",
    "Hand washing is the simplest way to prevent the spread of infection.",
)

_PUBLIC_TEMPLATES: tuple[str, ...] = (
    "In {specialty}, {condition} often presents with {symptom}. The diagnosis is usually "
    "supported by {test}, and standard treatment includes {treatment}.",
    "The {organ} belongs to the {system} system. Its main role is to {function}.",
    "The drug {drug} is {drug_class} used to {use}. A common side effect is {side_effect}, "
    "so patients are monitored during treatment.",
    "Doctors in {specialty} use {test} to confirm {condition} and to plan treatment.",
    "{fact}",
)


def _field_names(template: str) -> list[str]:
    """Slot names in template order; order matters because it fixes the random draws."""
    return list(dict.fromkeys(name for _, name, _, _ in _FORMATTER.parse(template) if name))


def _literal_text(template: str) -> str:
    """A template's fixed words, so the vocabulary corpus covers them."""
    return " ".join(literal for literal, _, _, _ in _FORMATTER.parse(template) if literal)


def _numbers(profile: _Profile) -> dict[str, _NumberRange]:
    """Numeric slots for a specialty: its own ranges override the adult defaults."""
    return {**_SHARED_NUMBERS, **profile.numbers}


def _fill(template: str, fixed: Mapping[str, str], profile: _Profile, rng: random.Random) -> str:
    """Fill a template: fixed values first, then categorical choices, then numbers."""
    choices = {**_SHARED_CHOICES, **profile.choices}
    numbers = _numbers(profile)
    values: dict[str, str] = {}
    for name in _field_names(template):
        if name in fixed:
            values[name] = fixed[name]
        elif name in choices:
            values[name] = rng.choice(choices[name])
        else:
            values[name] = numbers[name].sample(rng)
    return template.format(**values)


def _specialty_weights(specialty_mix: Mapping[str, float] | None) -> list[float]:
    """Validate a user's specialty mix and return weights aligned with ``SPECIALTIES``."""
    if specialty_mix is None:
        return [1.0] * len(SPECIALTIES)
    unknown = sorted(set(specialty_mix) - set(SPECIALTIES))
    if unknown:
        raise DataError(
            f"specialty_mix has unknown specialties {unknown}; valid ones are "
            f"{', '.join(SPECIALTIES)}"
        )
    weights = [float(specialty_mix.get(name, 0.0)) for name in SPECIALTIES]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"specialty_mix weights must be finite, non-negative and not all zero; "
            f"got {dict(specialty_mix)}"
        )
    return weights


def _patient_record(
    specialty: str, patient: Mapping[str, str], rng: random.Random
) -> ClinicalRecord:
    """One note or question/answer pair about a patient, in ~60/40 proportion."""
    profile = _PROFILES[specialty]
    templates = _NOTE_TEMPLATES if rng.random() < _NOTE_SHARE else _QA_TEMPLATES
    fixed = dict(patient)
    fixed["finding"] = _fill(rng.choice(profile.findings), fixed, profile, rng)
    text = _fill(rng.choice(templates), fixed, profile, rng)
    return ClinicalRecord(text=text, specialty=specialty, patient_id=patient["patient_id"])


def generate_clinical_records(
    num_records: int,
    specialty_mix: Mapping[str, float] | None,
    seed: int,
    hospital_tag: str = "",
) -> list[ClinicalRecord]:
    """Generate one hospital's private records, skewed towards its specialty mix.

    Each patient keeps one specialty, diagnosis, age, sex and history across their 1-5
    records (about 3 on average), which is what makes patient-level privacy meaningful.
    ``hospital_tag`` prefixes patient ids and also salts the random stream, so hospitals that
    share a base seed still hold different patients.
    """
    if num_records < 0:
        raise DataError(f"num_records must be >= 0, got {num_records}")
    weights = _specialty_weights(specialty_mix)
    rng = random.Random(f"fedllm-clinical:{seed}:{hospital_tag}")
    records: list[ClinicalRecord] = []
    patient_index = 0
    while len(records) < num_records:
        specialty = rng.choices(SPECIALTIES, weights=weights)[0]
        profile = _PROFILES[specialty]
        condition = rng.choice(profile.conditions)
        patient = {
            "patient_id": f"{hospital_tag}p{patient_index:05d}",
            "specialty": specialty,
            "age": _numbers(profile)["age"].sample(rng),
            "sex": rng.choice(profile.sexes),
            "history": rng.choice(profile.history),
            "condition": condition.name,
            "symptom": condition.symptom,
            "test": condition.test,
            "treatment": condition.treatment,
        }
        visits = min(rng.randint(*_RECORDS_PER_PATIENT), num_records - len(records))
        records.extend(_patient_record(specialty, patient, rng) for _ in range(visits))
        patient_index += 1
    rng.shuffle(records)
    return records


def _public_text(rng: random.Random) -> str:
    """One textbook-style sentence pair; shares vocabulary with, but no templates of, notes."""
    sentences = []
    for template in rng.sample(_PUBLIC_TEMPLATES, 2):
        specialty = rng.choice(SPECIALTIES)
        profile = _PROFILES[specialty]
        condition = rng.choice(profile.conditions)
        organ, system, function = rng.choice(_ORGANS)
        drug, drug_class, use, side_effect = rng.choice(_DRUGS)
        fixed = {
            "specialty": specialty,
            "condition": condition.name,
            "symptom": condition.symptom,
            "test": condition.test,
            "treatment": condition.treatment,
            "organ": organ,
            "system": system,
            "function": function,
            "drug": drug,
            "drug_class": drug_class,
            "use": use,
            "side_effect": side_effect,
            "fact": rng.choice(_GENERAL_FACTS),
        }
        sentences.append(_fill(template, fixed, profile, rng))
    return " ".join(sentences)


def generate_public_medical_text(num_texts: int, seed: int) -> list[str]:
    """Generate non-private, textbook-like medical text for pretraining the base model.

    It states the same medical facts as the private notes in a different register, so the
    base model knows the vocabulary but fine-tuning still has something private to learn.
    """
    if num_texts < 0:
        raise DataError(f"num_texts must be >= 0, got {num_texts}")
    rng = random.Random(f"fedllm-public:{seed}")
    return [_public_text(rng) for _ in range(num_texts)]


def _fragment_texts() -> Iterator[str]:
    """Every literal word, pool entry and printable number the generators can emit."""
    templates = _NOTE_TEMPLATES + _QA_TEMPLATES + _PUBLIC_TEMPLATES
    yield from (_literal_text(template) for template in templates)
    yield from SPECIALTIES
    yield from _GENERAL_FACTS
    yield from (" ".join(entry) for entry in _ORGANS + _DRUGS)
    for choices in (_SHARED_CHOICES, *(p.choices for p in _PROFILES.values())):
        yield from (" ".join(values) for values in choices.values())
    for number_ranges in (_SHARED_NUMBERS, *(p.numbers for p in _PROFILES.values())):
        yield from (" ".join(r.all_values()) for r in number_ranges.values())
    for profile in _PROFILES.values():
        yield from (_literal_text(finding) for finding in profile.findings)
        yield " ".join(profile.history + profile.sexes)
        for condition in profile.conditions:
            yield f"{condition.name} {condition.symptom} {condition.test} {condition.treatment}"


def vocabulary_corpus(seed: int = 0) -> list[str]:
    """Texts covering every word the generators can emit, for training a local tokenizer.

    The exhaustive fragment list guarantees coverage (no unknown tokens at fine-tuning time);
    the generated samples give the tokenizer realistic word co-occurrences to merge on.
    """
    samples = [record.text for record in generate_clinical_records(1000, None, seed)]
    return [*_fragment_texts(), *samples, *generate_public_medical_text(1000, seed)]
