"""Customers: create one, read one, list them page by page."""

from fastapi_pagination import Page, Params, create_page
from loguru import logger
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from db import is_duplicate_key, retry_conflicts
from errors import ApiError
from models import Customer, CustomerCreate, CustomerPublic


class CustomerNotFoundError(ApiError):
    status_code = 404
    documented = "No customer has this id; nothing was written"

    def __init__(self, customer_id: int) -> None:
        super().__init__(f"Customer {customer_id} not found")


class EmailTakenError(ApiError):
    status_code = 409
    documented = "A customer already has this email (ignoring letter case)"

    def __init__(self, email: str) -> None:
        super().__init__(f"A customer with the email {email} already exists")


async def create_customer(session: AsyncSession, request: CustomerCreate) -> CustomerPublic:
    """Insert a customer; an email already taken, in any letter case, is a 409 (the unique
    index on its lower-cased form decides, so two concurrent creates cannot both win)."""

    async def insert() -> Customer:
        customer = Customer(
            customer_name=request.customer_name, customer_email=request.customer_email
        )
        session.add(customer)
        try:
            await session.commit()
        except IntegrityError as error:
            if not is_duplicate_key(error):
                raise
            raise EmailTakenError(request.customer_email) from None
        return customer

    # On a cluster, the same email inserted on another node at the same moment fails
    # certification (a lost race), not the unique index; the next try meets the index.
    customer = await retry_conflicts(session, insert)
    logger.info("customer {} created", customer.customer_id)
    assert customer.customer_id is not None  # the insert's generated id
    return CustomerPublic(
        customer_id=customer.customer_id,
        customer_name=customer.customer_name,
        customer_email=customer.customer_email,
    )


async def get_customer_or_404(session: AsyncSession, customer_id: int) -> CustomerPublic:
    customer = await session.get(Customer, customer_id)
    if customer is None:
        raise CustomerNotFoundError(customer_id)
    return CustomerPublic.model_validate(customer.model_dump())


async def list_customers(session: AsyncSession, params: Params) -> Page[CustomerPublic]:
    """By customerId; a customer list is small next to invoices, so COUNT(*) is fine."""
    raw = params.to_raw_params().as_limit_offset()
    total = (await session.exec(select(func.count()).select_from(Customer))).one()
    rows = await session.exec(
        select(Customer).order_by(col(Customer.customer_id)).offset(raw.offset).limit(raw.limit)
    )
    items = [CustomerPublic.model_validate(customer.model_dump()) for customer in rows]
    return create_page(items, total=total, params=params)  # type: ignore[return-value]
